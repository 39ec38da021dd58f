"""``ShardActor``: the thin shell around one ``ShardEngine`` (all logic lives in the engine).

A shard host (``shard.host``) holds many of these, one per shard replica on its node, and
forwards every shard verb to them; the host gives them its background pools and its
same-node fast path (``Hosting``). Without ``hosting`` (unit tests) the engine runs its own
background threads and there is no fast path. Calls are concurrent (the host is a threaded
Ray actor): queries run while a write or the engine's background maintenance is in
progress; the engine is thread-safe.

**Data lost on restart.** A shard that existed may be opened where its node-local data
directory is empty (its node died and placement put it on another one, or the directory was
wiped). Opened so (``restarted``), it does not serve an empty shard as if nothing happened:
every read and write raises ``DataLost`` naming the node and the directory, and ``ready()``
reports it. The state survives further restarts (a ``LOST_DATA`` file in the data
directory). The coordinator fails reads over to another replica and refills this one with a
catch-up, which calls ``clear_lost`` first; with one replica, an operator brings the data
back (or accepts the loss) and deletes the file (docs/deploy.md).

Fault injection (tests and drills only): ``set_delay(seconds)`` makes every read verb (get,
search, keyword_search, list_objects, stats) sleep that long before answering, simulating a slow
shard; ``set_delay(0)`` turns it off. The env var ``COLSHARD_FAULT_READ_DELAY_S`` sets it at
open. The delay lives in the host process only (a restart clears it).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster.errors import DataLost, NotFound
from cluster.objectstore import ObjectStore, S3Url, is_s3
from cluster.raynode import ray_node_id
from cluster.settings import ShardSettings, node_data_dir
from cluster.spec import CollectionSpec
from cluster.types import (
    F32,
    KeywordSearch,
    ObjectBatch,
    ShardSearchResult,
    ShardStats,
    StoredObject,
    VectorSearch,
    WriteResult,
)
from shard import kernels
from shard.engine import BackgroundPools, ShardEngine
from shard.fastpath import FastPathServer
from shard.manifest import MANIFEST
from shard.metrics import ShardMetrics

LOST_MARKER = "LOST_DATA"


def _holds_data(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@dataclass(frozen=True)
class Hosting:
    """What a shard host shares with the shards it holds (``ShardActor(hosting=...)``)."""

    pools: BackgroundPools
    fast: FastPathServer | None


class ShardActor:
    def __init__(
        self,
        spec_json: str,
        shard: int,
        data_dir: str,
        settings: ShardSettings,
        subdir: str | None = None,
        restarted: bool = False,
        hosting: Hosting | None = None,
    ) -> None:
        """With ``subdir`` the shard's data lives in ``<node data dir>/<subdir>``, where the
        node data dir is this Ray node's ``COLSHARD_DATA_DIR`` (else ``data_dir``): on a
        multi-node cluster each shard keeps its data on the node it runs on. ``restarted``:
        the shard existed before (an empty data directory is then a loss). With ``hosting``
        the shard lives in a shard host (``shard.host``): its background work runs on the
        host's pools, its fast path is the host's and the host refreshes its gauges."""
        spec = CollectionSpec.from_json(spec_json)
        self._spec = spec
        self._shard = shard
        path = node_data_dir(data_dir) / subdir if subdir else Path(data_dir)
        self._data_dir = path
        had_data = _holds_data(path)
        self._engine = ShardEngine(spec, shard, path, settings)
        self._lost: str | None = None
        marker = path / LOST_MARKER
        if marker.exists():
            self._lost = marker.read_text().strip() or "data lost"
        elif not had_data and restarted:
            self._lost = (
                f"shard {spec.name}:{shard} was restarted on node "
                f"{ray_node_id()[:12] or '?'} ({socket.gethostname()}) with an empty "
                f"data directory {path}: its data is where it ran before"
            )
            marker.write_text(self._lost + "\n")
        self._hosting = hosting
        self._engine.start_background(hosting.pools if hosting is not None else None)
        kernels.warm()  # compile or load the MaxSim kernels now, not in the first query
        self._metrics = ShardMetrics(spec.name, shard)
        self._started = time.time()
        self._read_delay_s = float(os.environ.get("COLSHARD_FAULT_READ_DELAY_S", "0") or 0)

    def refresh_gauges(self) -> None:
        """Record the size gauges (objects, tokens, segments) now; the host calls it every
        ``shard.host.GAUGE_INTERVAL_S`` (a no-op without metrics)."""
        if not self._metrics.enabled:
            return
        try:
            self._metrics.record_stats(self._engine.stats())
        except Exception:  # engine dropped or closing: the next round (if any) retries
            return

    def set_delay(self, seconds: float) -> float:
        """Fault-injection hook (see the module docstring): delay every read by ``seconds``.
        Returns the previous delay."""
        previous, self._read_delay_s = self._read_delay_s, max(0.0, float(seconds))
        return previous

    def _fault_delay(self) -> None:
        if self._read_delay_s > 0:
            time.sleep(self._read_delay_s)

    def _serving(self) -> None:
        if self._lost is not None:
            raise DataLost(
                self._lost,
                {"shard": f"{self._spec.name}:{self._shard}", "data_dir": str(self._data_dir)},
            )

    def clear_lost(self) -> str | None:
        """Serve again after a data loss (the coordinator calls it before a catch-up refills
        this replica). Returns what was lost (None if nothing was)."""
        lost, self._lost = self._lost, None
        (self._data_dir / LOST_MARKER).unlink(missing_ok=True)
        return lost

    def ready(self) -> dict[str, Any]:
        fast = self._hosting.fast if self._hosting is not None else None
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray_node_id(),
            "started": self._started,
            "objects": self._engine.count(),
            "data_dir": str(self._data_dir),
            "data_lost": self._lost,
            "fast_path": str(fast.path) if fast is not None else None,
            "fast_path_served": fast.served if fast is not None else 0,
        }

    def upsert(self, batch: ObjectBatch) -> list[WriteResult]:
        self._serving()
        results = self._engine.upsert(batch)
        self._metrics.record_import(batch)
        return results

    def delete(self, uuids: Sequence[str]) -> list[bool]:
        self._serving()
        return self._engine.delete(uuids)

    def get(self, uuid: str, include_vectors: bool) -> StoredObject | None:
        self._fault_delay()
        self._serving()
        return self._engine.get(uuid, include_vectors)

    def search(self, req: VectorSearch) -> ShardSearchResult:
        self._fault_delay()
        self._serving()
        start = time.perf_counter()
        result = self._engine.search(req)
        self._metrics.record_search(time.perf_counter() - start, result.n_candidates)
        return result

    def keyword_search(self, req: KeywordSearch) -> ShardSearchResult:
        self._fault_delay()
        self._serving()
        return self._engine.keyword_search(req)

    def list_objects(
        self, after: str | None, limit: int, include_vectors: bool
    ) -> list[StoredObject]:
        self._fault_delay()
        self._serving()
        return self._engine.list_objects(after, limit, include_vectors)

    def sample_queries(self, vector: str, n: int, seed: int) -> list[F32]:
        """Queries for measuring recall (the recall report): ShardEngine.sample_queries."""
        self._fault_delay()
        self._serving()
        return self._engine.sample_queries(vector, n, seed)

    def stats(self) -> ShardStats:
        self._fault_delay()
        stats = replace(self._engine.stats(), pid=os.getpid())
        self._metrics.record_stats(stats)
        return stats if self._lost is None else replace(stats, data_lost=self._lost)

    def stage_backup(self) -> dict[str, Any]:
        """``ShardEngine.stage_backup``: the cut, fast (hard links and a WAL copy)."""
        self._serving()
        return self._engine.stage_backup()

    def finish_backup(self, staging: str, dest: str) -> dict[str, Any]:
        """``ShardEngine.finish_backup``: the staged copy moved or copied to ``dest`` (a
        directory, or an s3:// URL it is uploaded to)."""
        self._serving()
        return self._engine.finish_backup(Path(staging), dest if is_s3(dest) else Path(dest))

    def restore(self, src: str) -> dict[str, Any]:
        """Replace this shard's data with the backup copy at ``src`` and serve it: the engine
        closes (calls meanwhile fail over or retry), the copy replaces the data directory and
        the engine reopens from it (recovery replays the copy's WAL, rebuilds BM25)."""
        fetched: Path | None = None
        if is_s3(src):  # downloaded next to the data directory first (this node's disk)
            fetched = self._data_dir.with_name(f".{self._data_dir.name}.restore")
            shutil.rmtree(fetched, ignore_errors=True)
            ObjectStore().download_tree(S3Url.parse(src), fetched)
        source = fetched or Path(src)
        if not (source / MANIFEST).exists() and not (source / "wal").is_dir():
            raise NotFound(f"no shard backup at {src}", {"path": str(src)})
        settings = self._engine.settings
        self._engine.close()
        shutil.rmtree(self._data_dir, ignore_errors=True)
        if fetched is not None:
            os.rename(fetched, self._data_dir)
        else:
            shutil.copytree(source, self._data_dir, copy_function=shutil.copy2)
        self._engine = ShardEngine(self._spec, self._shard, self._data_dir, settings)
        self._engine.start_background(self._hosting.pools if self._hosting is not None else None)
        self._lost = None
        return {"objects": self._engine.count()}

    def close(self) -> None:
        """Close the engine; the data stays (it reopens from it)."""
        self._engine.close()

    def drop(self) -> None:
        self.close()
        self._engine.drop()
