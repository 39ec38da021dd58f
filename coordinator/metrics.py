"""Coordinator metrics exported through ``ray.util.metrics`` (Ray's Prometheus endpoint; the
Ray dashboard's Metrics page): query latency by collection, query kind and outcome, partial
answers, and objects written by outcome. No-ops outside a Ray worker (unit tests)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from cluster.errors import ColshardError
from cluster.ids import COLLECTION_NAME_RE
from cluster.types import WriteResult

log = logging.getLogger(__name__)

QUERY_BOUNDARIES_S = [0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def collection_label(name: str) -> str:
    """The collection's name as a metric label; a request naming an invalid collection (any
    text a client sent) is counted under ``_invalid`` so labels stay bounded and ASCII."""
    return name if isinstance(name, str) and COLLECTION_NAME_RE.match(name) else "_invalid"


def outcome(exc: BaseException | None) -> str:
    """``ok``, or the colshard error code (``internal`` for anything else)."""
    if exc is None:
        return "ok"
    return exc.code if isinstance(exc, ColshardError) else "internal"


class CoordinatorMetrics:
    def __init__(self) -> None:
        self._query: Any = None
        try:
            from ray.util import metrics

            self._query = metrics.Histogram(
                "colshard_coordinator_query_seconds",
                "Query latency at the coordinator (vectorize, fan-out, merge)",
                boundaries=QUERY_BOUNDARIES_S,
                tag_keys=("collection", "kind", "outcome"),
            )
            self._partial = metrics.Counter(
                "colshard_coordinator_partial_queries",
                "Queries answered without some shards (allow_partial)",
                tag_keys=("collection",),
            )
            self._written = metrics.Counter(
                "colshard_coordinator_objects_written",
                "Objects in write batches by outcome",
                tag_keys=("collection", "outcome"),
            )
        except Exception:  # not inside a Ray worker: metrics off
            self._query = None

    @property
    def enabled(self) -> bool:
        return self._query is not None

    def record_query(
        self,
        collection: str,
        kind: str,
        seconds: float,
        exc: BaseException | None,
        missing_shards: int = 0,
    ) -> None:
        if self._query is None:
            return
        try:  # metrics never fail a request
            collection = collection_label(collection)
            self._query.observe(
                seconds, tags={"collection": collection, "kind": kind, "outcome": outcome(exc)}
            )
            if missing_shards:
                self._partial.inc(1.0, tags={"collection": collection})
        except Exception:
            log.debug("recording query metrics failed", exc_info=True)

    def record_writes(
        self,
        collection: str,
        results: Sequence[WriteResult] | None,
        exc: BaseException | None,
        n_requested: int,
    ) -> None:
        if self._query is None:
            return
        try:  # metrics never fail a request
            collection = collection_label(collection)
            if results is None:  # the whole batch failed
                if n_requested > 0:
                    self._written.inc(
                        float(n_requested), tags={"collection": collection, "outcome": outcome(exc)}
                    )
                return
            n_ok = sum(1 for r in results if r.ok)
            for label, n in (("ok", n_ok), ("failed", len(results) - n_ok)):
                if n > 0:  # Counter.inc rejects non-positive values
                    self._written.inc(float(n), tags={"collection": collection, "outcome": label})
        except Exception:
            log.debug("recording write metrics failed", exc_info=True)
