"""Backups: a consistent copy of collections to the backup root, and restoring one.

Layout under the backup root (``Settings.backup_target``: ``--backup-dir``, a directory or an
``s3://bucket/prefix`` URL (``S3Root``), default ``<data_dir>/backups``)::

    <id>/backup.json             {"id", "created", "finished", "state": running|done|failed,
                                  "error", "collections": {name: {"state": staging|copying|
                                  done, "spec", "objects", "shards": [{"shard", "objects",
                                  "segments", "bytes"}]}}}
    <id>/<collection>/shard-<s>/ a shard's data directory (shard.engine.ShardEngine.backup)

The cut: while a collection's shards stage their copies the coordinator holds the write lock of
every one of them (``ReplicaSet.write_lock``: a write holds it until every replica answered),
so no write of that collection is in flight and each shard's copy holds exactly the writes
acknowledged before the cut; writes arriving meanwhile wait (the shards stage by hard links,
so the wait is short) and are not in the backup. Then, with writes going on, each shard moves
or copies its staged copy into the backup (``run``). Collections are cut one after another.

Restore creates the collection (under its own name or a new one) with the backed-up spec, then
every replica of every shard replaces its empty data with the shard's copy and reopens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import AlreadyExists, ColshardError, InternalError, InvalidInput, NotFound
from cluster.objectstore import ObjectStore, S3Url, is_s3
from cluster.spec import CollectionSpec
from coordinator.fanout import ShardClient
from coordinator.queries import Shards, spec_in
from coordinator.routing import RoutingTable

log = logging.getLogger(__name__)

BACKUP_FILE = "backup.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not _ID.match(backup_id) or ".." in backup_id:
        raise InvalidInput(
            "a backup id is 1-128 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit",
            {"id": backup_id},
        )
    return backup_id


class DirRoot:
    """Backups in a directory (``--backup-dir PATH``; on several nodes, storage every node
    mounts at the same path)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def create(self, backup_id: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            (self.path / backup_id).mkdir()
        except FileExistsError:
            raise AlreadyExists(f"backup {backup_id!r} exists", {"id": backup_id}) from None

    def write_info(self, backup_id: str, info: Mapping[str, Any]) -> None:
        path = self.path / backup_id / BACKUP_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=1, default=str))
        os.replace(tmp, path)

    def info_bytes(self, backup_id: str) -> bytes:
        try:
            return (self.path / backup_id / BACKUP_FILE).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"backup {backup_id!r} does not exist", {"id": backup_id}) from None

    def ids(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(e.name for e in self.path.iterdir() if (e / BACKUP_FILE).exists())

    def remove(self, backup_id: str) -> None:
        shutil.rmtree(self.path / backup_id)

    def shard(self, backup_id: str, collection: str, shard: int) -> str:
        return str(self.path / backup_id / collection / f"shard-{shard}")


class S3Root:
    """Backups in S3-compatible storage (``--backup-dir s3://bucket/prefix``,
    ``cluster.objectstore``): each shard uploads and downloads its own copy from its node."""

    def __init__(self, url: str, store: ObjectStore | None = None) -> None:
        self.url = S3Url.parse(url)
        self._store = store

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore()
        return self._store

    def create(self, backup_id: str) -> None:
        if self.store.exists(self.url.join(backup_id, BACKUP_FILE)):
            raise AlreadyExists(f"backup {backup_id!r} exists", {"id": backup_id})

    def write_info(self, backup_id: str, info: Mapping[str, Any]) -> None:
        data = json.dumps(info, indent=1, default=str).encode()
        self.store.put_bytes(self.url.join(backup_id, BACKUP_FILE), data)

    def info_bytes(self, backup_id: str) -> bytes:
        try:
            return self.store.get_bytes(self.url.join(backup_id, BACKUP_FILE))
        except NotFound:
            raise NotFound(f"backup {backup_id!r} does not exist", {"id": backup_id}) from None

    def ids(self) -> list[str]:
        return self.store.children(self.url)

    def remove(self, backup_id: str) -> None:
        self.store.delete_tree(self.url.join(backup_id))

    def shard(self, backup_id: str, collection: str, shard: int) -> str:
        return str(self.url.join(backup_id, collection, f"shard-{shard}"))


Root = DirRoot | S3Root


def root_of(target: Path | str) -> Root:
    """The backup root of ``Settings.backup_target``: an s3:// URL or a directory."""
    if isinstance(target, str) and is_s3(target):
        return S3Root(target)
    return DirRoot(Path(target))


def read_info(root: Root, backup_id: str) -> dict[str, Any]:
    raw = root.info_bytes(check_id(backup_id))
    try:
        info: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        raise InternalError(f"backup {backup_id!r}: unreadable {BACKUP_FILE}: {exc}") from exc
    return info


def list_infos(root: Root) -> list[dict[str, Any]]:
    """Every backup under ``root`` (oldest first), without the specs."""
    out = []
    for backup_id in root.ids():
        with contextlib.suppress(ColshardError):
            info = read_info(root, backup_id)
            info["collections"] = {
                n: {"objects": c.get("objects", 0), "shards": len(c.get("shards", []))}
                for n, c in info.get("collections", {}).items()
            }
            out.append(info)
    return sorted(out, key=lambda i: float(i.get("created", 0)))


async def _all_write_locks(shards: Shards) -> contextlib.AsyncExitStack:
    stack = contextlib.AsyncExitStack()
    for rs in shards:  # always in shard order: two cuts cannot deadlock
        await stack.enter_async_context(rs.write_lock)
    return stack


@dataclass
class Started:
    """A backup whose ``backup.json`` (state running) exists; ``run`` writes it."""

    root: Root
    chosen: list[str]
    specs: list[CollectionSpec]
    info: dict[str, Any]


def begin(root: Root, backup_id: str, names: Sequence[str] | None, table: RoutingTable) -> Started:
    """Check ``backup_id`` and ``names`` (None: every collection of ``table``) and create the
    backup: InvalidInput, NotFound or AlreadyExists before anything is written."""
    check_id(backup_id)
    chosen = sorted(table.specs) if names is None else list(dict.fromkeys(names))
    specs = [spec_in(table, n) for n in chosen]  # NotFound before anything is written
    root.create(backup_id)
    info: dict[str, Any] = {
        "id": backup_id,
        "created": time.time(),
        "state": "running",
        "collections": {},
    }
    root.write_info(backup_id, info)
    return Started(root, chosen, specs, info)


async def run(
    started: Started, table: RoutingTable, timeout_s: float, copy_timeout_s: float
) -> dict[str, Any]:
    """Write the backup ``begin`` started; its ``backup.json`` ends done or failed.

    Per collection, in two steps: the cut — every shard stages its copy (hard links, a WAL
    copy) while the coordinator holds all the collection's write locks, each in at most
    ``timeout_s`` — then, with writes going on, every shard moves or copies its staged copy
    into the backup directory, each in at most ``copy_timeout_s`` (a large shard copied to
    other storage takes as long as its bytes)."""
    root, chosen, specs, info = started.root, started.chosen, started.specs, started.info
    backup_id = info["id"]

    async def save() -> None:
        await asyncio.to_thread(root.write_info, backup_id, info)

    try:
        for spec in specs:
            shards = table.shard_sets(spec.name)
            info["collections"][spec.name] = {"state": "staging"}
            await save()
            async with await _all_write_locks(shards):
                staged = await asyncio.gather(
                    *(rs.read(_stage, timeout_s) for rs in shards), return_exceptions=True
                )
            info["collections"][spec.name] = {"state": "copying"}
            await save()
            # every staged copy is finished (moved into the backup, which a failure marks
            # failed), so none stays behind in a shard's data directory
            todo = [
                (s, item) for s, item in enumerate(staged) if not isinstance(item, BaseException)
            ]
            finished = await asyncio.gather(
                *(
                    _finish(client, stage, root.shard(backup_id, spec.name, s), copy_timeout_s)
                    for s, (client, stage) in todo
                ),
                return_exceptions=True,
            )
            errors = [x for x in (*staged, *finished) if isinstance(x, BaseException)]
            if errors:
                raise errors[0]
            copies = [c for c in finished if not isinstance(c, BaseException)]
            info["collections"][spec.name] = {
                "state": "done",
                "spec": spec.to_dict(),
                "objects": sum(int(c.get("objects", 0)) for c in copies),
                "shards": [{"shard": s, **c} for s, c in enumerate(copies)],
            }
            await save()
        info.update(state="done", finished=time.time())
    except Exception as exc:
        error = exc.to_dict() if isinstance(exc, ColshardError) else {"message": repr(exc)}
        info.update(state="failed", finished=time.time(), error=error)
        raise
    finally:
        await save()
    log.warning("backup %s of %s done: %s", backup_id, chosen, info["collections"].keys())
    return info


async def _stage(client: ShardClient, timeout_s: float) -> tuple[ShardClient, dict[str, Any]]:
    """One replica's cut (``ReplicaSet.read`` picks a serving one); its client comes back with
    it, so the same replica finishes the copy."""
    return client, await client.stage_backup(timeout_s)


async def _finish(
    client: ShardClient, staged: Mapping[str, Any], dest: str, timeout_s: float
) -> dict[str, Any]:
    copied = await client.finish_backup(str(staged["staging"]), dest, timeout_s)
    return {"objects": staged["objects"], **copied}


def restored_spec(info: Mapping[str, Any], collection: str, new_name: str | None) -> dict[str, Any]:
    """The spec a restore creates: the backed-up one, under ``new_name`` when given."""
    entry = info.get("collections", {}).get(collection)
    if info.get("state") != "done":
        raise InvalidInput(
            f"backup {info.get('id')!r} is {info.get('state')}: only a finished backup restores",
            {"id": info.get("id"), "state": info.get("state")},
        )
    if entry is None:
        raise NotFound(
            f"backup {info.get('id')!r} holds no collection {collection!r}",
            {"id": info.get("id"), "collection": collection},
        )
    return {**entry["spec"], "name": new_name or collection}


async def fill(
    root: Root,
    info: Mapping[str, Any],
    collection: str,
    spec: CollectionSpec,
    shards: Shards,
    timeout_s: float,
) -> dict[str, Any]:
    """Every replica of every shard of the new collection ``spec`` takes its shard's copy."""
    entry = info["collections"][collection]
    if len(shards) != len(entry["shards"]):
        raise InternalError(
            f"backup has {len(entry['shards'])} shards of {collection!r}, the new collection "
            f"{len(shards)}"
        )
    backup_id = str(info["id"])
    async with await _all_write_locks(shards):
        done = await asyncio.gather(
            *(
                r.client.restore(root.shard(backup_id, collection, s), timeout_s)
                for s, rs in enumerate(shards)
                for r in rs.replicas
            )
        )
    rf = max(1, spec.replication_factor)
    return {
        "collection": spec.name,
        "from": {"backup": info["id"], "collection": collection},
        "objects": sum(int(d.get("objects", 0)) for d in done) // rf,
    }


def remove(root: Root, backup_id: str) -> None:
    read_info(root, backup_id)  # NotFound
    root.remove(backup_id)
