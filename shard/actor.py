"""``ShardActor``: the thin Ray shell around ``ShardEngine`` (all logic lives in the engine).

Placement wraps this class with ``ray.remote`` and names the actor
``colshard:<collection>:<shard>[:<replica>]`` so it shows in the Ray dashboard. The actor is
threaded (``max_concurrency`` > 1): queries run while a write or the engine's background
maintenance is in progress; the engine is thread-safe.

**Data lost on restart.** Ray restarts a crashed shard actor, possibly on another node, where
the shard's node-local data directory is empty. An actor that Ray restarted (not created) and
that finds its data directory empty (missing, or without any file) does not serve an empty
shard as if nothing happened: every read and write raises ``DataLost`` naming the node and the
directory, and ``ready()`` reports it. The state survives further restarts (a ``LOST_DATA``
file in the data directory). The coordinator fails reads over to another replica and refills
this one with a catch-up, which calls ``clear_lost`` first; with one replica, an operator
brings the data back (or accepts the loss) and deletes the file (docs/deploy.md).

**Same-node fast path.** Besides its Ray methods the actor serves ``search`` and
``keyword_search`` on a Unix socket (``shard.fastpath``, ``cluster.localrpc``; its path is in
``ready()``), which a coordinator on the same node uses instead of a Ray call (~1.5 ms less per
query here). ``COLSHARD_FAST_PATH=0`` turns it off.

Fault injection (tests and drills only): ``set_delay(seconds)`` makes every read verb (get,
search, keyword_search, list_objects, stats) sleep that long before answering, simulating a slow
shard; ``set_delay(0)`` turns it off. The env var ``COLSHARD_FAULT_READ_DELAY_S`` sets it at actor
start. The delay lives in the actor process only (a restart clears it).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster import localrpc
from cluster.errors import DataLost, NotFound
from cluster.objectstore import ObjectStore, S3Url, is_s3
from cluster.raynode import ray_node_id, ray_runtime_context
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

GAUGE_INTERVAL_S = 10.0
LOST_MARKER = "LOST_DATA"


def restarted_by_ray() -> bool:
    """Whether Ray restarted this actor (False outside Ray, or when Ray cannot tell)."""
    ctx = ray_runtime_context()
    try:
        return ctx is not None and bool(ctx.was_current_actor_reconstructed)
    except Exception:
        return False


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
        restarted: bool | None = None,
        hosting: Hosting | None = None,
    ) -> None:
        """With ``subdir`` the shard's data lives in ``<node data dir>/<subdir>``, where the
        node data dir is this Ray node's ``COLSHARD_DATA_DIR`` (else ``data_dir``): on a
        multi-node cluster each shard keeps its data on the node it runs on. ``restarted``:
        whether this is a restart (None: ask Ray). With ``hosting`` the shard lives in a shard
        host (``shard.host``): its background work runs on the host's pools, its fast path is
        the host's and the host refreshes its gauges."""
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
        elif not had_data and (restarted if restarted is not None else restarted_by_ray()):
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
        # Size gauges (objects, tokens, segments) stay fresh without anyone asking for stats.
        self._stop = threading.Event()
        self._fast: FastPathServer | None = None
        if hosting is not None:
            return
        if localrpc.enabled():
            try:
                self._fast = FastPathServer(
                    {"search": self.search, "keyword_search": self.keyword_search}
                )
            except OSError as exc:  # no usable socket directory: Ray calls only
                logging.getLogger(__name__).warning("no fast path: %s", exc)
        if self._metrics.enabled:
            threading.Thread(
                target=self._refresh_gauges, name="colshard-gauges", daemon=True
            ).start()

    def _refresh_gauges(self) -> None:
        while not self._stop.wait(GAUGE_INTERVAL_S):
            self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """Record the size gauges now (a no-op without metrics)."""
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
        fast = self._hosting.fast if self._hosting is not None else self._fast
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
        """Stop serving and close the engine; the data stays (it reopens from it)."""
        self._stop.set()
        if self._fast is not None:
            self._fast.close()
        self._engine.close()

    def drop(self) -> None:
        self.close()
        self._engine.drop()
