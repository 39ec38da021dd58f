"""Deadlines and intervals shared by more than one module, named once.

Each module's own tunables stay beside the code that uses them; what is here is what two
layers must agree on (a probe's deadline, how often rounds run)."""

from __future__ import annotations

# ``ready()`` of one replica in a background round (repair, membership): short, the round
# tries again.
PROBE_TIMEOUT_S = 2.0
# ``ready()`` of a shard for /readyz.
READY_PROBE_TIMEOUT_S = 5.0
# Per-replica stats for /v1/cluster.
STATS_TIMEOUT_S = 2.0
# One placement record written to etcd.
PLACEMENT_TIMEOUT_S = 3.0
# The repair loop (catch-up of stale replicas, placement rewrites) runs this often.
REPAIR_INTERVAL_S = 1.0
