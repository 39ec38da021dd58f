"""Shard metrics exported through ``ray.util.metrics`` (scraped by Ray's Prometheus endpoint and
shown on the Ray dashboard's Metrics page). Falls back to no-ops outside a Ray worker."""

from __future__ import annotations

from typing import Any

from cluster.types import ObjectBatch, ShardStats

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class ShardMetrics:
    def __init__(self, collection: str, shard: int) -> None:
        self._tags = {"collection": collection, "shard": str(shard)}
        self._latency: Any = None
        try:
            from ray.util import metrics

            keys = ("collection", "shard")
            self._latency = metrics.Histogram(
                "colshard_shard_search_seconds",
                "Shard search latency",
                boundaries=LATENCY_BOUNDARIES_S,
                tag_keys=keys,
            )
            self._candidates = metrics.Histogram(
                "colshard_shard_candidates",
                "Documents re-scored exactly per query",
                boundaries=[10, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                tag_keys=keys,
            )
            self._imported = metrics.Counter(
                "colshard_shard_imported_tokens", "Tokens imported", tag_keys=keys
            )
            self._objects = metrics.Gauge("colshard_shard_objects", "Live objects", tag_keys=keys)
            self._tokens = metrics.Gauge("colshard_shard_tokens", "Stored tokens", tag_keys=keys)
            self._segments = metrics.Gauge("colshard_shard_segments", "Segments", tag_keys=keys)
        except Exception:  # not inside a Ray worker (unit tests): metrics off
            self._latency = None

    @property
    def enabled(self) -> bool:
        return self._latency is not None

    def record_search(self, seconds: float, n_candidates: int) -> None:
        if self._latency is not None:
            self._latency.observe(seconds, tags=self._tags)
            self._candidates.observe(float(n_candidates), tags=self._tags)

    def record_import(self, batch: ObjectBatch) -> None:
        if self._latency is not None:
            n_tokens = sum(col.n_rows for col in batch.vectors.values())
            if n_tokens > 0:  # Counter.inc rejects non-positive values
                self._imported.inc(float(n_tokens), tags=self._tags)

    def record_stats(self, stats: ShardStats) -> None:
        if self._latency is not None:
            self._objects.set(float(stats.n_objects), tags=self._tags)
            self._tokens.set(float(sum(stats.n_tokens.values())), tags=self._tags)
            self._segments.set(float(stats.n_segments), tags=self._tags)
