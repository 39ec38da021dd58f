"""Deadlines and intervals shared by more than one module, named once.

Each module's own tunables stay beside the code that uses them; what is here is what two
layers must agree on (a probe's deadline, how often rounds run)."""

from __future__ import annotations

# ``ready()`` of one replica in a background round (repair, membership): short, the round
# tries again.
PROBE_TIMEOUT_S = 2.0
# ``ready()`` of a shard for /readyz, for a catch-up's first look at a stale replica, and for a
# shard client re-checking its same-node fast path.
READY_PROBE_TIMEOUT_S = 5.0
# /readyz: how long the gateway waits for the coordinator's answer.
READINESS_TIMEOUT_S = 10.0
# A query's coordinator call may take its own deadline plus this (the coordinator answers 504
# itself at the deadline; the margin covers the answer's way back).
QUERY_ANSWER_MARGIN_S = 5.0
# Per-replica stats for /v1/cluster.
STATS_TIMEOUT_S = 2.0
# One placement record written to etcd.
PLACEMENT_TIMEOUT_S = 3.0
# The repair loop (catch-up of stale replicas, placement rewrites) runs this often.
REPAIR_INTERVAL_S = 1.0
