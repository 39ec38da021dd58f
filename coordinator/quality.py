"""The recall report (``GET /v1/collections/{name}/quality``): recall@k of the collection's
search measured now, per shard and collection-wide, against exact MaxSim.

1. Each shard contributes sample queries in proportion to its objects
   (``ShardEngine.sample_queries``: recent real queries, else queries made from its objects).
2. Every query runs on every shard twice: as served (the calibrated index) and with
   ``exact`` (MaxSim over every object). A shard's recall compares its own two top-k lists; the
   collection's compares their merges (``merge_top_k``, as a query's fan-out does), so it is
   the recall a user's query gets, coordinator merge included.
3. Recall per query counts a hit as found when its exact score reaches the k-th exact score
   (``cluster.recall.recall_at``); means come with one-sided 95 % bounds
   (``cluster.recall.interval``).

Beside the measurement, each shard's calibration (its chosen depth and the recall it measured
then, from its stats) is reported, so the two can be compared.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from cluster.errors import InvalidInput
from cluster.recall import interval, recall_at, target_of
from cluster.spec import CollectionSpec
from cluster.types import F32, Hit, ShardSearchResult, VectorSearch
from coordinator.fanout import ShardClient, gather_shards
from coordinator.merge import merge_top_k
from coordinator.replication import ReplicaSet

DEFAULT_QUERIES = 50
MAX_QUERIES = 500
MAX_K = 1_000
# Queries measured at once (each one is 2 calls per shard).
IN_FLIGHT = 4


def check_request(
    spec: CollectionSpec, vector: str | None, k: int | None, queries: int
) -> tuple[str, int]:
    """``(vector, k)`` of a recall report request, or InvalidInput / NotFound."""
    if vector is None:
        if len(spec.vectors) != 1:
            raise InvalidInput(
                "the collection has several named vectors: say which one (vector=...)",
                {"vectors": [v.name for v in spec.vectors]},
            )
        vector = spec.vectors[0].name
    vspec = spec.vector(vector)
    if k is None:
        k = target_of(vspec.index.options)[1]
    if not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be in 1..{MAX_K}", {"k": k})
    if not 1 <= queries <= MAX_QUERIES:
        raise InvalidInput(f"queries must be in 1..{MAX_QUERIES}", {"queries": queries})
    return vector, k


def _shares(objects: Mapping[int, int], n: int) -> dict[int, int]:
    """``n`` queries split over the shards in proportion to their objects (each with any
    objects gets at least one)."""
    total = sum(objects.values())
    if total == 0:
        return {}
    return {s: max(1, math.ceil(n * c / total)) for s, c in objects.items() if c > 0}


def _sampler(
    vector: str, n: int, seed: int
) -> Callable[[ShardClient, float], Awaitable[list[F32]]]:
    return lambda c, t: c.sample_queries(vector, n, seed, t)


def _searcher(req: VectorSearch) -> Callable[[ShardClient, float], Awaitable[ShardSearchResult]]:
    return lambda c, t: c.search(req, t)


async def measure(
    spec: CollectionSpec,
    vector: str,
    k: int,
    n_queries: int,
    seed: int,
    shards: Sequence[ReplicaSet],
    timeout_s: float,
    detail: bool = False,
) -> dict[str, Any]:
    """The report (module docstring); ``detail``: also every query, its served and exact top
    k (uuids) and its recall, for checking the report against another oracle."""
    vspec = spec.vector(vector)
    target, target_k = target_of(vspec.index.options)
    stats, stat_failures = await gather_shards(
        {s: rs.read(lambda c, t: c.stats(t), timeout_s) for s, rs in enumerate(shards)},
        allow_partial=True,
    )
    shares = _shares({s: st.n_objects for s, st in stats.items()}, n_queries)
    samples, sample_failures = await gather_shards(
        {s: shards[s].read(_sampler(vector, n, seed + s), timeout_s) for s, n in shares.items()},
        allow_partial=True,
    )
    queries: list[F32] = [q for s in sorted(samples) for q in samples[s]][:n_queries]
    per_shard: dict[int, list[float]] = {s: [] for s in stats}
    overall: list[float] = []
    details: list[dict[str, Any]] = []
    failed: set[int] = set(stat_failures) | set(sample_failures)

    async def one(query: F32) -> None:
        calls = {}
        for s in stats:
            for exact in (False, True):
                req = VectorSearch(
                    target_vector=vector,
                    query=query,
                    k=k,
                    return_properties=(),
                    exact=exact,
                    probe=True,
                )
                calls[(s, exact)] = shards[s].read(_searcher(req), timeout_s)
        keys = list(calls)
        outcomes = await asyncio.gather(*calls.values(), return_exceptions=True)
        got: dict[tuple[int, bool], list[Hit]] = {}
        for key, out in zip(keys, outcomes, strict=True):
            if isinstance(out, BaseException):
                if not isinstance(out, Exception):
                    raise out
                failed.add(key[0])
                continue
            got[key] = list(out.hits)
        answered = [s for s in stats if (s, False) in got and (s, True) in got]
        for s in answered:
            per_shard[s].append(
                recall_at([h.score for h in got[(s, False)]], [h.score for h in got[(s, True)]], k)
            )
        if len(answered) == len(stats):
            served = merge_top_k((got[(s, False)] for s in answered), 0, k)
            exact_hits = merge_top_k((got[(s, True)] for s in answered), 0, k)
            overall.append(recall_at([h.score for h in served], [h.score for h in exact_hits], k))
            if detail:
                details.append(
                    {
                        "query": query.tolist(),
                        "recall": overall[-1],
                        "served": [h.uuid for h in served],
                        "exact": [h.uuid for h in exact_hits],
                    }
                )

    for i in range(0, len(queries), IN_FLIGHT):
        await asyncio.gather(*(one(q) for q in queries[i : i + IN_FLIGHT]))
    mean, low, high = interval(overall)
    report: dict[str, Any] = {
        "collection": spec.name,
        "vector": vector,
        "k": k,
        "queries": len(overall),
        "seed": seed,
        "target": target,
        "target_k": target_k,
        "recall": round(mean, 4) if overall else None,
        "ci_low": round(low, 4) if overall else None,
        "ci_high": round(high, 4) if overall else None,
        "meets_target": (low >= target) if overall and k == target_k else None,
        "shards": [],
        "failed_shards": sorted(failed),
    }
    for s in range(spec.shard_count):
        r = per_shard.get(s, [])
        m, lo, hi = interval(r)
        st = stats.get(s)
        report["shards"].append(
            {
                "shard": s,
                "objects": st.n_objects if st is not None else None,
                "queries": len(r),
                "recall": round(m, 4) if r else None,
                "ci_low": round(lo, 4) if r else None,
                "ci_high": round(hi, 4) if r else None,
                "calibration": (dict(st.calibration.get(vector, {})) if st is not None else None),
            }
        )
    if detail:
        report["detail"] = details
    return report
