"""``ShardHost``: one process per node holding every shard engine placed on that node.

A Ray actor process costs ~130–143 MB even when its shard is empty (the interpreter, Ray's
worker, numpy, ScaNN, the compiled kernels), so one actor per shard made 26 small collections
use 7.6 GB. A shard host is one detached actor per Ray node (``colshard:host:<node_id[:8]>``,
pinned to its node; ``coordinator.placement`` creates it and chooses which node each shard
goes to). It holds many ``ShardActor`` objects, each still its own data directory, WAL, lock
and placement record; what they share is the process, the compiled kernels, two background
pools (``shard.background``: maintenance, calibration), one same-node fast-path socket and
one gauge thread. An idle shard then costs its engine's own state (about 0.07 MB; the
budget is 20 MB, tested in ``tests/unit/test_shard_host.py`` and the many-collections
integration test).

Every shard verb is ``call(key, method, args)``, where the key is the shard replica's name
(``colshard:<collection>:<shard>[:<replica>]``, the name its own actor had); the coordinator
names each Ray task ``<key>.<method>``, so the dashboard's task list shows which shard a call
was for. ``info()`` lists the shards a host holds (``colshard status`` / ``/v1/cluster``).

**Restarts.** A host lists the shards it holds in ``<node data dir>/_hosts/<host name>/``
(one small file per shard: its ``open`` arguments). Ray restarts a crashed host on its node
(``max_restarts=-1``, hard node affinity); the restarted host reopens every listed shard
(recovering each from its data directory, in a background thread; a call for one not reopened
yet opens it first), so background work and the data-loss check resume as they did when each
shard was its own actor. A freshly created host (not a restart) clears the list: the
coordinator opens what it wants. A call for a shard the host does not hold raises
``ShardNotOpen``, and the coordinator's client opens it there and retries. A host whose node
died is gone for good; the client then asks placement for another node, where a shard that
existed opens with ``restarted`` semantics: an empty data directory there is ``DataLost``
(``shard.actor``), refilled from another replica.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import resource
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster import localrpc
from cluster.errors import InvalidInput, ShardNotOpen
from cluster.raynode import ray_node_id, restarted_by_ray
from cluster.settings import ShardSettings, node_data_dir
from shard import kernels
from shard.actor import Hosting, ShardActor
from shard.background import BackgroundPool
from shard.engine import BackgroundPools
from shard.fastpath import FastPathServer
from shard.maintenance import lower_priority

log = logging.getLogger(__name__)

# The ShardActor methods a host forwards (everything the coordinator's ShardClient calls).
VERBS = frozenset(
    {
        "ready",
        "upsert",
        "delete",
        "get",
        "search",
        "keyword_search",
        "list_objects",
        "sample_queries",
        "stats",
        "clear_lost",
        "set_delay",
        "stage_backup",
        "finish_backup",
        "restore",
        "drop",
    }
)
MAINTENANCE_WORKERS = 2
GAUGE_INTERVAL_S = 10.0  # how often the host records its shards' size gauges
HOSTS_DIR = "_hosts"  # under the node data dir: each host's list of held shards
CALIBRATION_WORKERS = 1


def private_memory_bytes(pid: int | str = "self") -> int:
    """Private (unshared) resident memory of a process: ``Private_Clean + Private_Dirty`` of
    ``/proc/<pid>/smaps_rollup`` (0 where there is no such file)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def raise_open_files_limit() -> int:
    """Lift this process's soft open-files limit to its hard one (each shard holds a few
    files open: its WAL, its lock, its keyword index); returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return int(soft)


class ShardHost:
    """The shards of one node in one process (see the module docstring)."""

    def __init__(self, name: str = "", data_dir: str = "", restarted: bool | None = None) -> None:
        """``data_dir``: the coordinator's (the node's ``COLSHARD_DATA_DIR`` wins), where the
        list of held shards lives; without it there is none. ``restarted``: whether this is a
        restart (None: ask Ray)."""
        self._name = name
        self._shards: dict[str, ShardActor] = {}
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self._registry = (
            node_data_dir(data_dir) / HOSTS_DIR / name.replace(":", "-") if data_dir else None
        )
        self._pending: dict[str, tuple[Any, ...]] = {}
        self._open_files = raise_open_files_limit()
        self._pools = BackgroundPools(
            BackgroundPool("colshard-maint", MAINTENANCE_WORKERS, on_start=lower_priority),
            BackgroundPool(
                "colshard-calibrate",
                CALIBRATION_WORKERS,
                idle_min_s=2.0,
                idle_max_s=10.0,
                on_start=lower_priority,
            ),
        )
        kernels.warm()
        self._fast: FastPathServer | None = None
        if localrpc.enabled():
            try:
                self._fast = FastPathServer(
                    {"search": self._fast_search, "keyword_search": self._fast_keyword_search}
                )
            except OSError as exc:  # no usable socket directory: Ray calls only
                log.warning("no fast path: %s", exc)
        self._hosting = Hosting(self._pools, self._fast)
        self._stop = threading.Event()
        threading.Thread(target=self._gauges, name="colshard-gauges", daemon=True).start()
        if restarted if restarted is not None else restarted_by_ray():
            self._pending = self._listed()
            threading.Thread(target=self._reopen, name="colshard-reopen", daemon=True).start()
        else:
            self._clear_list()

    # ---- the list of held shards (restarts) ------------------------------------------------

    def _entry(self, key: str) -> Path | None:
        return self._registry / f"{key.replace(':', '-')}.pickle" if self._registry else None

    def _listed(self) -> dict[str, tuple[Any, ...]]:
        found: dict[str, tuple[Any, ...]] = {}
        if self._registry is None or not self._registry.is_dir():
            return found
        for path in sorted(self._registry.glob("*.pickle")):
            try:
                key, args = pickle.loads(path.read_bytes())
                found[str(key)] = tuple(args)
            except Exception:  # a torn or foreign file: that shard opens when next asked
                log.warning("unreadable shard list entry %s; skipped", path)
        return found

    def _list(self, key: str, args: tuple[Any, ...]) -> None:
        path = self._entry(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps((key, args), protocol=5))
            os.replace(tmp, path)
        except OSError as exc:  # a restart then reopens it when asked (ShardNotOpen)
            log.warning("cannot list shard %s in %s: %s", key, path.parent, exc)

    def _unlist(self, key: str) -> None:
        path = self._entry(key)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def _clear_list(self) -> None:
        if self._registry is not None:
            shutil.rmtree(self._registry, ignore_errors=True)

    def _open_listed(self, key: str, args: tuple[Any, ...]) -> None:
        spec_json, shard, data_dir, settings, subdir = args
        self.open(key, spec_json, shard, data_dir, settings, subdir, existed=True)

    def _reopen(self) -> None:
        """After a restart: reopen every listed shard (one failing does not stop the rest)."""
        for key in list(self._pending):
            args = self._pending.get(key)
            if args is None:
                continue  # opened meanwhile by a call, or dropped
            try:
                self._open_listed(key, args)
            except Exception:
                log.exception("reopening shard %s after a restart failed", key)

    # ---- shards ----------------------------------------------------------------------------

    def open(
        self,
        key: str,
        spec_json: str,
        shard: int,
        data_dir: str,
        settings: ShardSettings,
        subdir: str | None = None,
        existed: bool = False,
    ) -> dict[str, Any]:
        """Open shard ``key`` here unless it is open already; returns its ``ready()``.
        ``existed``: the shard was created before (a data directory found empty is then a
        loss, not a new shard)."""
        with self._lock:
            gate = self._opening.setdefault(key, threading.Lock())
        with gate:
            actor = self._shards.get(key)
            if actor is None:
                self._pending.pop(key, None)
                actor = ShardActor(
                    spec_json, shard, data_dir, settings, subdir, existed, self._hosting
                )
                with self._lock:
                    self._shards[key] = actor
                self._list(key, (spec_json, shard, data_dir, settings, subdir))
        return self._ready(key, actor)

    def _ready(self, key: str, actor: ShardActor) -> dict[str, Any]:
        return {**actor.ready(), "key": key, "shard_host": self._name}

    def _shard(self, key: str) -> ShardActor:
        actor = self._shards.get(key)
        if actor is None and key in self._pending:  # listed before a restart: reopen it now
            with contextlib.suppress(KeyError):
                self._open_listed(key, self._pending[key])
            actor = self._shards.get(key)
        if actor is None:
            raise ShardNotOpen(
                f"shard {key} is not open on this host", {"shard": key, "host": self._name}
            )
        return actor

    def call(self, key: str, method: str, args: Sequence[Any] = ()) -> Any:
        """``ShardActor.<method>(*args)`` of shard ``key``."""
        if method not in VERBS:
            raise InvalidInput(f"unknown shard verb {method!r}", {"verb": method})
        actor = self._shard(key)
        if method == "ready":
            return self._ready(key, actor)
        result = getattr(actor, method)(*args)
        if method == "drop":
            self._forget(key, actor)
        return result

    def close(self, key: str) -> bool:
        """Close shard ``key`` here, keeping its data (False: it was not open)."""
        actor = self._shards.get(key)
        if actor is None:
            return False
        actor.close()
        self._forget(key, actor)
        return True

    def _forget(self, key: str, actor: ShardActor) -> None:
        with self._lock:
            if self._shards.get(key) is actor:
                del self._shards[key]
                self._opening.pop(key, None)
                self._unlist(key)

    def _fast_search(self, key: str, req: Any) -> Any:
        return self._shard(key).search(req)

    def _fast_keyword_search(self, key: str, req: Any) -> Any:
        return self._shard(key).keyword_search(req)

    # ---- the host --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        with self._lock:
            keys = sorted(self._shards)
        return {
            "name": self._name,
            "pid": os.getpid(),
            "node_id": ray_node_id(),
            "shards": keys,
            "private_memory_bytes": private_memory_bytes(),
            "open_files_limit": self._open_files,
            "fast_path": str(self._fast.path) if self._fast is not None else None,
            "fast_path_served": self._fast.served if self._fast is not None else 0,
        }

    def _gauges(self) -> None:
        while not self._stop.wait(GAUGE_INTERVAL_S):
            with self._lock:
                actors = list(self._shards.values())
            for actor in actors:
                actor.refresh_gauges()

    def shutdown(self) -> None:
        """Close every shard (data kept) and the pools: for tests and orderly exits."""
        self._stop.set()
        with self._lock:
            items = list(self._shards.items())
        for key, actor in items:
            try:
                actor.close()
            except Exception:
                log.exception("closing shard %s failed", key)
            with self._lock:
                self._shards.pop(key, None)  # still listed: a restart would reopen it
        self._pools.maintenance.close()
        self._pools.calibration.close()
        if self._fast is not None:
            self._fast.close()
