"""``/v1/cluster`` from one snapshot of the routing table: members, every replica's placement
record (``coordinator.routing``) with its live counts overlaid, and the shards with no
available replica."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from cluster.timing import STATS_TIMEOUT_S
from coordinator.routing import ReplicaId, ReplicaState, RoutingTable, placements_view


async def replica_stats(
    table: RoutingTable, timeout_s: float = STATS_TIMEOUT_S
) -> dict[ReplicaId, dict[str, Any]]:
    """Object/token/segment counts of every available replica (short deadline each)."""
    entries = [e for e in table.entries() if e.outage is None]
    outcomes = await asyncio.gather(
        *(e.client.stats(timeout_s) for e in entries), return_exceptions=True
    )
    out: dict[ReplicaId, dict[str, Any]] = {}
    for entry, stats in zip(entries, outcomes, strict=True):
        if isinstance(stats, BaseException):
            if not isinstance(stats, Exception):
                raise stats
            continue
        row: dict[str, Any] = {
            "objects": stats.n_objects,
            "tokens": sum(stats.n_tokens.values()),
            "segments": stats.n_segments,
            "bytes_on_disk": stats.bytes_on_disk,
        }
        if stats.pid:  # the live process: the placement record's may predate a restart
            row["pid"] = stats.pid
        if stats.data_lost:  # restarted without its data: shown as such, whatever state
            row.update(state=str(ReplicaState.DATA_LOST), reason=stats.data_lost)
        out[entry.id] = row
    return out


def cluster_view(
    table: RoutingTable,
    members: Mapping[str, Any],
    stats: Mapping[ReplicaId, Mapping[str, Any]],
    last_ok_seq: Callable[[ReplicaId], int],
) -> dict[str, Any]:
    """Members, placements (with ``stats`` overlaid), per-collection object counts (a shard
    counts its fullest answering replica) and the unavailable shards."""
    collections = placements_view(table, last_ok_seq)
    for name, col in collections.items():
        per_shard: dict[int, int] = {}
        for p in col["placements"]:
            p.update(stats.get(ReplicaId(name, int(p["shard"]), int(p["replica"])), {}))
            per_shard[p["shard"]] = max(per_shard.get(p["shard"], 0), int(p.get("objects", 0)))
        col["objects"] = sum(per_shard.values())
    return {
        "members": dict(members),
        "collections": collections,
        "unavailable_shards": table.unavailable_shards(),
    }
