"""Merge per-shard top lists into one page: k-way merge, dedupe by id, offset applied once.

Shards each return their best ``offset + limit`` hits (best first). The global order is score
descending, then uuid ascending, so equal scores give a stable, documented order.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from cluster.types import Hit


def hit_key(hit: Hit) -> tuple[float, str]:
    return (-hit.score, hit.uuid)


def merge_top_k(per_shard: Iterable[Sequence[Hit]], offset: int, limit: int) -> list[Hit]:
    """The global page ``[offset, offset+limit)`` from per-shard lists sorted by ``hit_key``.

    A uuid seen twice (replicas, or a write racing a query) keeps its first, best-ranked hit.
    """
    if offset < 0 or limit < 0:
        raise ValueError("offset and limit must be non-negative")
    wanted = offset + limit
    if limit == 0:
        return []
    lists = [sorted(hits, key=hit_key) for hits in per_shard]
    out: list[Hit] = []
    seen: set[str] = set()
    for hit in heapq.merge(*lists, key=hit_key):
        if hit.uuid in seen:
            continue
        seen.add(hit.uuid)
        out.append(hit)
        if len(out) >= wanted:
            break
    return out[offset:]
