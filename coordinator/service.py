"""The coordinator's logic, plain async Python: lifecycle, schema changes, writes (routing and
replication), repair, and the cluster views; reads are ``coordinator.queries.Reads``. The
``CoordinatorActor`` shell (actor.py) wires it to etcd and Ray; unit tests wire it to fakes
behind the same ``ClusterStore`` / ``Placement`` / ``ShardClient`` interfaces.

Routing truth is the ``coordinator.routing.Router``'s table: every verb reads one snapshot of it,
and the query path never reads etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Protocol

from cluster import limits
from cluster.errors import (
    ColshardError,
    DataLost,
    DeadlineExceeded,
    InvalidInput,
    PayloadTooLarge,
    TooManyRequests,
    Unavailable,
)
from cluster.ids import normalize_uuid
from cluster.pooling import pool_batch, pooled_vectors
from cluster.query import QueryRequest, QueryResult
from cluster.settings import Settings
from cluster.spec import CollectionSpec, NamedVectorSpec, VectorizerSpec
from cluster.timing import PROBE_TIMEOUT_S, READY_PROBE_TIMEOUT_S, REPAIR_INTERVAL_S
from cluster.types import (
    ObjectBatch,
    StoredObject,
    WriteResult,
)
from cluster.validation import (
    ColumnarInput,
    ObjectInput,
    prepare_batch,
    prepare_columnar,
)
from coordinator import backups, quality, views
from coordinator.fanout import ShardClient, gather_shards
from coordinator.moves import MovePlacement, Mover
from coordinator.queries import Reads, Shards, parse_filter, spec_in, target
from coordinator.replication import (
    STALE,
    ConsistencyLevel,
    ReplicaSet,
    parse_consistency,
)
from coordinator.routing import ReplicaEntry, ReplicaId, ReplicaState, Router
from coordinator.vectorize import VectorizerClient, Vectorizers

log = logging.getLogger(__name__)
DELETE_PAGE = 1000
# Objects encoded and written together when a vectorizer computes their vectors: what one
# import request holds in embeddings at a time (e.g. MiniLM: ≤ 128 × 256 tokens × 384 × 4 B).
VECTORIZE_CHUNK = 128


class ClusterStore(Protocol):
    """What the coordinator needs from the cluster store (cluster.etcd_store.EtcdStore)."""

    async def create_collection(self, spec: CollectionSpec) -> int: ...
    async def get_collection(self, name: str) -> CollectionSpec | None: ...
    async def list_collections(self) -> dict[str, CollectionSpec]: ...
    async def delete_collection(self, name: str) -> bool: ...
    async def put_placement(
        self, collection: str, shard: int, replica: int, info: Mapping[str, Any]
    ) -> None: ...
    async def get_placements(self, collection: str) -> dict[tuple[int, int], dict[str, Any]]: ...
    async def ping(self) -> bool: ...
    async def list_members(self) -> dict[str, dict[str, Any]]: ...


class Placement(MovePlacement, Protocol):
    """Placement (``coordinator.placement``): ``open_shard`` and the moves' verbs come from
    ``MovePlacement``."""

    def kill_shard(self, spec: CollectionSpec, shard: int, replica: int) -> None: ...
    def open_vectorizer(self, spec: VectorizerSpec) -> VectorizerClient: ...


async def _list_page(
    after: str | None, limit: int, client: ShardClient, timeout_s: float
) -> list[StoredObject]:
    return await client.list_objects(after, limit, False, timeout_s)


async def _delete(uuids: Sequence[str], client: ShardClient, timeout_s: float) -> list[bool]:
    return await client.delete(uuids, timeout_s)


class Coordinator:
    def __init__(
        self,
        store: ClusterStore,
        placement: Placement,
        settings: Settings,
        vectorizers: Vectorizers | None = None,
    ) -> None:
        self._store = store
        self._placement = placement
        self._settings = settings
        self._vectorizers = vectorizers or Vectorizers(
            placement.open_vectorizer, settings.write_timeout_s
        )
        # The routing truth and its one writer (coordinator.routing); reads go through Reads.
        self.router = Router(store)
        self.reads = Reads(self.router, settings, self._vectorizers)
        self._schema_lock = asyncio.Lock()
        self._quality_lock = asyncio.Lock()  # one recall report at a time
        self._backup_lock = asyncio.Lock()  # one backup or restore at a time
        self._backup_task: asyncio.Task[None] | None = None  # a backup written in the background
        self._repair_task: asyncio.Task[None] | None = None
        self._rebalance_task: asyncio.Task[None] | None = None
        self.mover = Mover(self.router, placement, lambda: self._settings.write_timeout_s)
        self._backup_root = backups.root_of(settings.backup_target)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every collection from the store and (re)attach its shard actors."""
        specs = await self._store.list_collections()
        for spec in specs.values():
            await self._open_collection(spec, existed=True)

    async def _open_collection(self, spec: CollectionSpec, existed: bool = False) -> None:
        """Open (or reattach: ``existed``, each replica on the node its placement record
        names while that node is alive) every replica of ``spec``, enter them in the routing
        table and write their placements (raising when etcd does not take them)."""
        timeout_s = self._settings.write_timeout_s
        known = await self._store.get_placements(spec.name) if existed else {}
        shards = [
            [
                self._placement.open_shard(
                    spec, s, r, str(known.get((s, r), {}).get("node_id") or ""), existed
                )
                for r in range(spec.replication_factor)
            ]
            for s in range(spec.shard_count)
        ]
        infos = await asyncio.gather(*(c.ready(timeout_s) for reps in shards for c in reps))
        # Replicas recorded as stale (they missed writes) stay stale until caught up.
        entries = []
        seqs: dict[ReplicaId, int] = {}
        it = iter(infos)
        for s, reps in enumerate(shards):
            for r, client in enumerate(reps):
                info = next(it)
                before = known.get((s, r), {})
                sync = ReplicaState.READY
                if STALE in (before.get("state"), before.get("previous_state")):
                    sync = ReplicaState.STALE
                elif info.get("data_lost") and spec.replication_factor > 1:
                    log.warning("%s", info["data_lost"])
                    sync = ReplicaState.STALE  # the repair loop refills it from a ready one
                rid = ReplicaId(spec.name, s, r)
                seqs[rid] = int(before.get("last_ok_seq", 0) or 0)
                entries.append(
                    ReplicaEntry(
                        rid,
                        client,
                        sync,
                        actor=client.shard_id.actor_name(
                            r if spec.replication_factor > 1 else None
                        ),
                        node_id=str(info.get("node_id", "")),
                        host=str(info.get("host", "")),
                        pid=int(info.get("pid", 0) or 0),
                        shard_host=str(info.get("shard_host", "")),
                    )
                )
        rf = spec.replication_factor
        sets = [
            ReplicaSet.over(self.router, entries[s * rf : (s + 1) * rf])
            for s in range(spec.shard_count)
        ]
        self.router.add_collection(spec, entries, sets, seqs)
        await self.router.flush(raise_errors=True)

    async def flush_placements(self) -> int:
        """Write every changed placement record to etcd; returns how many are still
        pending (etcd unreachable)."""
        return await self.router.flush()

    # ---- repair ----------------------------------------------------------------------------

    def start_background(self) -> None:
        """Start the repair loop (catch-up of stale replicas, placement rewrites) and the
        rebalancing loop (``coordinator.moves``; not with ``rebalance_interval_s`` 0)."""
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.ensure_future(self._repair_loop())
        interval = self._settings.rebalance_interval_s
        if interval > 0 and (self._rebalance_task is None or self._rebalance_task.done()):
            self._rebalance_task = asyncio.ensure_future(self._rebalance_loop(interval))

    async def stop_background(self) -> None:
        for task in (self._repair_task, self._rebalance_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._repair_task = self._rebalance_task = None

    async def _rebalance_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.mover.rebalance_once()
            except Exception:
                log.exception("rebalancing round failed")

    async def _repair_loop(self) -> None:
        while True:
            try:
                await self.repair_once()
            except Exception:
                log.exception("repair round failed")
            await asyncio.sleep(REPAIR_INTERVAL_S)

    async def repair_once(self) -> dict[str, Any]:
        """One round: catch up every stale replica that answers, then rewrite placement
        records etcd has not seen yet. Returns what was caught up."""
        caught: dict[str, Any] = {}
        table = self.router.table
        for name, sets in table.sets.items():
            spec = table.specs[name]
            for rs in sets:
                rs.promote_if_all_stale()
                for replica in rs.stale():
                    try:
                        await replica.client.ready(PROBE_TIMEOUT_S)
                    except ColshardError:
                        # Dead for good (killed, restarts exhausted)? Placement recreates the
                        # actor by name (or returns the one that is restarting); it recovers
                        # from its data dir and is caught up on a later round.
                        with contextlib.suppress(Exception):
                            replica.client = self._placement.open_shard(
                                spec, rs.shard, replica.index, replica.entry().node_id, existed=True
                            )
                        continue
                    try:
                        stats = await rs.catch_up(replica, self._settings.write_timeout_s)
                    except ColshardError as exc:
                        log.warning(
                            "catch-up of %s:%d failed: %s", rs.name, replica.index, exc.message
                        )
                        continue
                    if stats is not None:
                        caught[f"{name}:{rs.shard}:{replica.index}"] = stats
        if self.router.pending:
            await self.router.flush()
        return caught

    # ---- moves and drains (coordinator.moves) ----------------------------------------------

    async def move_replica(
        self, name: str, shard: int, replica: int, to_node: str
    ) -> dict[str, Any]:
        return await self.mover.move(name, shard, replica, to_node)

    async def drain_node(self, node_id: str) -> dict[str, Any]:
        return await self.mover.drain(node_id)

    async def undrain_node(self, node_id: str) -> dict[str, Any]:
        return self.mover.undrain(node_id)

    # ---- schema ----------------------------------------------------------------------------

    async def create_collection(self, raw: Mapping[str, Any]) -> CollectionSpec:
        spec = CollectionSpec.from_dict(raw)
        spec = await self._fill_vectorizer_dims(spec)
        async with self._schema_lock:
            if spec.name not in self.router.table.specs:  # else: AlreadyExists, below
                limits.check_collection_count(len(self.router.table.specs), self._settings)
            await self._store.create_collection(spec)  # AlreadyExists if present (transaction)
            try:
                await self._open_collection(spec)
            except Exception:
                log.exception("creating shards of %s failed; rolling back", spec.name)
                await self._drop_shards(spec)
                self.router.drop_collection(spec.name)
                await self._store.delete_collection(spec.name)
                raise
        return spec

    async def _fill_vectorizer_dims(self, spec: CollectionSpec) -> CollectionSpec:
        """A vectorized named vector without ``dim`` takes its model's (loads the model once,
        so a broken model config fails the create, not the first import)."""
        vectors = []
        for vec in spec.vectors:
            if vec.vectorizer.kind != "none":
                model_dim = await self._vectorizers.dim(vec.vectorizer)
                if vec.dim not in (0, model_dim):
                    raise InvalidInput(
                        f"vector {vec.name!r}: dim {vec.dim} differs from the vectorizer's "
                        f"{model_dim}",
                        {"vector": vec.name, "dim": vec.dim, "vectorizer_dim": model_dim},
                    )
                vec = replace(vec, dim=model_dim)
            vectors.append(vec)
        return replace(spec, vectors=tuple(vectors))

    def spec(self, name: str) -> CollectionSpec:
        return spec_in(self.router.table, name)

    def _target(self, name: str) -> tuple[CollectionSpec, Shards]:
        return target(self.router.table, name)

    async def list_collections(self) -> list[CollectionSpec]:
        specs = self.router.table.specs
        return [specs[n] for n in sorted(specs)]

    async def delete_collection(self, name: str) -> None:
        async with self._schema_lock:
            spec = self.spec(name)
            # Fail fast (503) while etcd is unreachable, before any data is dropped.
            if not await self._store.ping():
                raise Unavailable(
                    f"cannot delete collection {name!r}: etcd is unreachable", {"collection": name}
                )
            await self._drop_shards(spec)
            self.router.drop_collection(name)
            await self._store.delete_collection(name)

    async def _drop_shards(self, spec: CollectionSpec) -> None:
        for rs in self.router.table.shard_sets(spec.name):
            for client in rs.clients():
                try:
                    await client.drop(self._settings.write_timeout_s)
                except Exception:
                    log.exception("dropping %s failed", client.shard_id)
        for s in range(spec.shard_count):
            for r in range(spec.replication_factor):
                self._placement.kill_shard(spec, s, r)

    async def describe_collection(self, name: str) -> dict[str, Any]:
        spec, shards = self._target(name)
        stats, failures = await gather_shards(
            {
                s: rs.read(lambda c, t: c.stats(t), self._settings.query_timeout_s)
                for s, rs in enumerate(shards)
            },
            allow_partial=True,
        )
        return {
            "spec": spec,
            "shards": [
                {
                    "shard": s,
                    "replicas": len(shards[s].replicas),
                    "replica_states": [r.state for r in shards[s].replicas],
                    "stats": stats.get(s),
                    "error": failures[s].to_dict() if s in failures else None,
                }
                for s in range(spec.shard_count)
            ],
        }

    async def quality(
        self,
        name: str,
        vector: str | None = None,
        k: int | None = None,
        queries: int = quality.DEFAULT_QUERIES,
        seed: int | None = None,
        detail: bool = False,
    ) -> dict[str, Any]:
        """The recall report (coordinator.quality): recall@k of the search as served, per shard
        and collection-wide, measured now against exact MaxSim on sample queries."""
        spec, shards = self._target(name)
        vector, k = quality.check_request(spec, vector, k, queries)
        seed = int(time.time()) if seed is None else seed
        if self._quality_lock.locked():  # each one runs exact MaxSim over every object
            raise TooManyRequests(
                "a recall report is being measured; one runs at a time, try again when it is done",
                {"collection": name},
            )
        async with self._quality_lock:
            return await quality.measure(
                spec, vector, k, queries, seed, shards, self._settings.query_timeout_s, detail
            )

    # ---- writes ----------------------------------------------------------------------------

    async def upsert(
        self,
        collection: str,
        objects: Sequence[ObjectInput] | ColumnarInput,
        api_keys: Mapping[str, str] | None = None,
        consistency_level: str | None = None,
    ) -> list[WriteResult]:
        """Upsert a batch; each shard's part is acknowledged once ``consistency_level``
        replicas applied it (coordinator/replication.py). Objects of a shard that missed its
        quorum come back failed (``unavailable``, naming the shard); when *every* object
        failed that way the whole call raises Unavailable (503) naming the shards."""
        spec = self.spec(collection)
        level = parse_consistency(consistency_level)
        limits.check_batch_size(len(objects), self._settings)
        if isinstance(objects, ColumnarInput):  # the Arrow import: vectors stay columnar
            if any(v.vectorizer.kind != "none" and objects.missing(v.name) for v in spec.vectors):
                objects = objects.to_objects()  # some vectors are still to be computed
            else:
                return await self._write_batch(spec, prepare_columnar(spec, objects), level)
        needs = [
            v
            for v in spec.vectors
            if v.vectorizer.kind != "none" and any(o.vectors.get(v.name) is None for o in objects)
        ]
        if not needs:
            return await self._write_batch(spec, prepare_batch(spec, objects), level)
        return await self._upsert_vectorized(spec, objects, needs, api_keys or {}, level)

    async def _upsert_vectorized(
        self,
        spec: CollectionSpec,
        objects: Sequence[ObjectInput],
        needs: Sequence[NamedVectorSpec],
        api_keys: Mapping[str, str],
        level: ConsistencyLevel,
    ) -> list[WriteResult]:
        """Objects some of whose vectors a vectorizer computes: validated whole first (bad input
        writes nothing; ids are fixed for every object), then encoded and written
        ``VECTORIZE_CHUNK`` objects at a time, so the coordinator holds one chunk's embeddings,
        never the request's. Past the write deadline the rest is not written
        (``DeadlineExceeded``; the chunks before it are, and a retry with the same ids
        overwrites them)."""
        n_vectorize = sum(1 for o in objects if any(o.vectors.get(v.name) is None for v in needs))
        cap = self._settings.max_vectorize_objects
        if cap and n_vectorize > cap:
            raise PayloadTooLarge(
                f"{n_vectorize} objects to vectorize in one request exceed the limit of {cap}; "
                f"split the batch",
                {"limit": "max_vectorize_objects", "max": cap, "got": n_vectorize},
            )
        checked = prepare_batch(spec, objects)
        objects = [
            dataclasses.replace(o, uuid=oid) for o, oid in zip(objects, checked.uuids, strict=True)
        ]
        del checked
        deadline = time.monotonic() + self._settings.write_timeout_s
        results: list[WriteResult] = []
        for start in range(0, len(objects), VECTORIZE_CHUNK):
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"the write ran past its deadline after {start} of {len(objects)} objects; "
                    f"those were written, the rest were not (retrying with the same ids is "
                    f"safe)",
                    {"written": start, "objects": len(objects)},
                )
            part = objects[start : start + VECTORIZE_CHUNK]
            vectorized = await self._vectorizers.documents(spec, needs, part, api_keys)
            batch = prepare_batch(spec, part, vectorized=vectorized)
            del vectorized
            results += await self._write_batch(spec, batch, level, raise_unavailable=not results)
        return results

    async def _write_batch(
        self,
        spec: CollectionSpec,
        batch: ObjectBatch,
        level: ConsistencyLevel,
        raise_unavailable: bool = True,
    ) -> list[WriteResult]:
        """Route a validated batch to its shards and write each part to its replicas. When
        every object failed for want of replicas (and ``raise_unavailable``), raise
        Unavailable naming the shards."""
        collection = spec.name
        if pooled_vectors(spec):
            # once, before routing: replicas (and catch-up) copy the pooled rows
            batch = await asyncio.to_thread(pool_batch, spec, batch)
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i, oid in enumerate(batch.uuids):
            by_shard[spec.shard_for(oid)].append(i)
        shards = self.router.table.shard_sets(collection)
        timeout_s = self._settings.write_timeout_s
        calls = {
            s: self._write_replicas(
                shards[s], batch.take(idx) if len(by_shard) > 1 else batch, level, timeout_s
            )
            for s, idx in by_shard.items()
        }
        done, failed = await gather_shards(calls, allow_partial=True)
        if (
            raise_unavailable
            and failed
            and not done
            and all(isinstance(e, Unavailable) for e in failed.values())
        ):
            names = [f"{collection}:{s}" for s in sorted(failed)]
            first = failed[min(failed)]
            raise Unavailable(
                f"write failed on shard(s) {', '.join(names)}: {first.message}",
                {**first.details, "shards": names},
            )
        results: list[WriteResult | None] = [None] * len(batch)
        for s, idx in by_shard.items():
            for pos, i in enumerate(idx):
                if s in done:
                    results[i] = done[s][pos]
                else:
                    results[i] = WriteResult(batch.uuids[i], False, failed[s].to_dict())
        return [r for r in results if r is not None]

    async def _write_replicas(
        self, rs: ReplicaSet, batch: Any, level: ConsistencyLevel, timeout_s: float
    ) -> list[WriteResult]:
        outcome = await rs.write(lambda c, t: c.upsert(batch, t), level, timeout_s)
        result: list[WriteResult] = outcome.result
        return result

    async def delete_object(
        self, collection: str, uuid: str, consistency_level: str | None = None
    ) -> bool:
        spec, shards = self._target(collection)
        level = parse_consistency(consistency_level)
        oid = normalize_uuid(uuid)
        rs = shards[spec.shard_for(oid)]
        outcome = await rs.write(
            lambda c, t: c.delete([oid], t), level, self._settings.write_timeout_s
        )
        return bool(outcome.result[0])

    async def delete_where(
        self,
        collection: str,
        raw_filter: Mapping[str, Any],
        dry_run: bool = False,
        consistency_level: str | None = None,
    ) -> dict[str, Any]:
        """Delete every object matching a filter. Each shard is paged through by id and the
        filter is evaluated on the properties, so the cost is one pass over the collection."""
        spec, shards = self._target(collection)
        level = parse_consistency(consistency_level)
        filt = parse_filter(spec, raw_filter, self._settings)
        timeout_s = self._settings.write_timeout_s
        matched = deleted = 0
        for s, rs in enumerate(shards):
            after: str | None = None
            while True:
                page = await rs.read(partial(_list_page, after, DELETE_PAGE), timeout_s)
                ids = [o.uuid for o in page if filt.matches(o.properties)]
                matched += len(ids)
                if ids and not dry_run:
                    outcome = await rs.write(partial(_delete, ids), level, timeout_s)
                    deleted += sum(outcome.result)
                if len(page) < DELETE_PAGE:
                    break
                after = page[-1].uuid
            log.info("delete_where %s shard %d: %d matched", collection, s, matched)
        return {"matched": matched, "deleted": deleted, "dry_run": dry_run}

    # ---- backups (coordinator.backups) -------------------------------------------------------

    async def backup(
        self, backup_id: str, collections: Sequence[str] | None = None, wait: bool = True
    ) -> dict[str, Any]:
        """A consistent copy of ``collections`` (None: all) as backup ``backup_id``; one
        backup or restore at a time (429 otherwise). ``wait``: return it when written; else
        return it started (state running; bad ids and names are still refused first) and
        write it in the background (``get_backup`` shows its progress)."""
        backups.check_id(backup_id)
        self._no_backup_running(backup_id)
        await self._backup_lock.acquire()
        try:
            table = self.router.table
            started = await asyncio.to_thread(
                backups.begin, self._backup_root, backup_id, collections, table
            )
            job = backups.run(
                started, table, self._settings.write_timeout_s, self._settings.backup_timeout_s
            )
        except BaseException:
            self._backup_lock.release()
            raise
        if wait:
            try:
                return await job
            finally:
                self._backup_lock.release()
        answer = copy.deepcopy(started.info)  # as started: the task goes on changing it
        self._backup_task = asyncio.create_task(self._in_background(job, backup_id))
        return answer

    async def _in_background(self, job: Awaitable[dict[str, Any]], backup_id: str) -> None:
        try:
            await job
        except Exception:  # backup.json says failed, and why
            log.exception("backup %s failed", backup_id)
        finally:
            self._backup_lock.release()

    def _no_backup_running(self, backup_id: str) -> None:
        if self._backup_lock.locked():  # one backup or restore at a time
            raise TooManyRequests(
                "a backup or restore is running; one runs at a time, try again when it is done",
                {"id": backup_id},
            )

    async def list_backups(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(backups.list_infos, self._backup_root)

    async def get_backup(self, backup_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(backups.read_info, self._backup_root, backup_id)

    async def delete_backup(self, backup_id: str) -> None:
        self._no_backup_running(backup_id)
        await asyncio.to_thread(backups.remove, self._backup_root, backup_id)

    async def restore(
        self, backup_id: str, collection: str, new_name: str | None = None
    ) -> dict[str, Any]:
        """Collection ``collection`` of backup ``backup_id``, restored as ``new_name`` (else
        its own name, which must be free): created, then filled from the copy. A restore that
        fails drops what it created."""
        root = self._backup_root
        info = await asyncio.to_thread(backups.read_info, root, backup_id)
        raw = backups.restored_spec(info, collection, new_name)
        self._no_backup_running(backup_id)
        async with self._backup_lock:
            spec = await self.create_collection(raw)
            try:
                return await backups.fill(
                    root,
                    info,
                    collection,
                    spec,
                    self.router.table.shard_sets(spec.name),
                    self._settings.backup_timeout_s,
                )
            except Exception:
                log.exception(
                    "restoring %s from backup %s failed; dropping it", spec.name, backup_id
                )
                with contextlib.suppress(Exception):
                    await self.delete_collection(spec.name)
                raise

    # ---- reads (coordinator.queries) ----------------------------------------------------------

    async def query(self, req: QueryRequest) -> QueryResult:
        return await self.reads.query(req)

    async def get_object(self, collection: str, uuid: str, include_vector: bool) -> StoredObject:
        return await self.reads.get_object(collection, uuid, include_vector)

    async def list_objects(
        self, collection: str, after: str | None, limit: int, include_vector: bool
    ) -> list[StoredObject]:
        return await self.reads.list_objects(collection, after, limit, include_vector)

    # ---- cluster ---------------------------------------------------------------------------

    async def cluster_info(self) -> dict[str, Any]:
        """Members, and every collection's placements with availability and per-replica
        counts, from one snapshot of the routing table."""
        table = self.router.table
        members = await self._store.list_members()
        stats = await views.replica_stats(table)
        return views.cluster_view(table, members, stats, self.router.last_ok_seq)

    async def readiness(self) -> dict[str, Any]:
        """etcd reachable and every shard of every collection has a replica that is available
        (its node is a member), answers and holds its data; from one snapshot."""
        table = self.router.table
        etcd_ok = False
        try:
            etcd_ok = await self._store.ping()
        except Unavailable:
            etcd_ok = False
        unplaced: set[str] = set(table.unavailable_shards())
        for name, shards in table.sets.items():
            _, failed = await gather_shards(
                {s: rs.read(_serving_ready, READY_PROBE_TIMEOUT_S) for s, rs in enumerate(shards)},
                allow_partial=True,
            )
            unplaced.update(f"{name}:{s}" for s in failed)
        return {
            "ready": etcd_ok and not unplaced,
            "etcd": etcd_ok,
            "unavailable_shards": sorted(unplaced),
        }


async def _serving_ready(client: ShardClient, timeout_s: float) -> Mapping[str, Any]:
    """``ready()``, counting a replica restarted without its data as not serving."""
    info = await client.ready(timeout_s)
    if info.get("data_lost"):
        raise DataLost(str(info["data_lost"]), {"shard": str(client.shard_id)})
    return info
