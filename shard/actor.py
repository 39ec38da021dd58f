"""``ShardActor``: the thin Ray shell around ``ShardEngine`` (all logic lives in the engine).

Placement wraps this class with ``ray.remote`` and names the actor
``colshard:<collection>:<shard>[:<replica>]`` so it shows in the Ray dashboard. The actor is
threaded (``max_concurrency`` > 1): queries run while a write or the engine's background
maintenance is in progress; the engine is thread-safe.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.settings import ShardSettings
from cluster.spec import CollectionSpec
from cluster.types import (
    KeywordSearch,
    ObjectBatch,
    ShardSearchResult,
    ShardStats,
    StoredObject,
    VectorSearch,
    WriteResult,
)
from shard.engine import ShardEngine
from shard.metrics import ShardMetrics


class ShardActor:
    def __init__(self, spec_json: str, shard: int, data_dir: str, settings: ShardSettings) -> None:
        spec = CollectionSpec.from_json(spec_json)
        self._spec = spec
        self._shard = shard
        self._engine = ShardEngine(spec, shard, Path(data_dir), settings)
        self._engine.start_background()
        self._metrics = ShardMetrics(spec.name, shard)
        self._started = time.time()

    def ready(self) -> dict[str, Any]:
        node_id = ""
        try:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray (unit tests): no node id
            node_id = ""
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node_id,
                "started": self._started, "objects": self._engine.count()}

    def upsert(self, batch: ObjectBatch) -> list[WriteResult]:
        results = self._engine.upsert(batch)
        self._metrics.record_import(batch)
        return results

    def delete(self, uuids: Sequence[str]) -> list[bool]:
        return self._engine.delete(uuids)

    def get(self, uuid: str, include_vectors: bool) -> StoredObject | None:
        return self._engine.get(uuid, include_vectors)

    def search(self, req: VectorSearch) -> ShardSearchResult:
        start = time.perf_counter()
        result = self._engine.search(req)
        self._metrics.record_search(time.perf_counter() - start, result.n_candidates)
        return result

    def keyword_search(self, req: KeywordSearch) -> ShardSearchResult:
        return self._engine.keyword_search(req)

    def list_objects(self, after: str | None, limit: int, include_vectors: bool
                     ) -> list[StoredObject]:
        return self._engine.list_objects(after, limit, include_vectors)

    def stats(self) -> ShardStats:
        stats = self._engine.stats()
        self._metrics.record_stats(stats)
        return stats

    def drop(self) -> None:
        self._engine.drop()
