"""The coordinator's logic, plain async Python: schema changes, write routing, query fan-out,
top-k merge. The ``CoordinatorActor`` shell (actor.py) wires it to etcd and Ray; unit tests wire
it to fakes behind the same ``ClusterStore`` / ``Placement`` / ``ShardClient`` interfaces.

Routing state is an in-memory snapshot (specs + shard clients); the query path never reads etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Protocol

from cluster.errors import (
    ColshardError,
    DataLost,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unavailable,
)
from cluster.ids import normalize_uuid, validate_collection_name
from cluster.query import QueryRequest, QueryResult, ResultObject
from cluster.settings import Settings
from cluster.spec import CollectionSpec, NamedVectorSpec, VectorizerSpec
from cluster.types import (
    Hit,
    KeywordSearch,
    ObjectBatch,
    StoredObject,
    VectorSearch,
    WriteResult,
)
from cluster.validation import (
    ColumnarInput,
    ObjectInput,
    prepare_batch,
    prepare_columnar,
    prepare_query_vector,
)
from coordinator import quality
from coordinator.fanout import ShardClient, gather_shards
from coordinator.fusion import fuse
from coordinator.merge import merge_top_k
from coordinator.replication import (
    STALE,
    ConsistencyLevel,
    Replica,
    ReplicaSet,
    parse_consistency,
)
from coordinator.vectorize import VectorizerClient, Vectorizers

log = logging.getLogger(__name__)
HYBRID_MIN_CANDIDATES = 100
DELETE_PAGE = 1000
REPAIR_INTERVAL_S = 1.0
MAX_QUERY_TIMEOUT_S = 300.0
# Objects encoded and written together when a vectorizer computes their vectors: what one
# import request holds in embeddings at a time (e.g. MiniLM: ≤ 128 × 256 tokens × 384 × 4 B).
VECTORIZE_CHUNK = 128
_TASKS: set[asyncio.Future[Any]] = set()
# The running query's deadline (loop time); shard calls get what is left of it.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("colshard_deadline",
                                                                         default=None)
PLACEMENT_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 2.0


class ClusterStore(Protocol):
    """What the coordinator needs from the cluster store (cluster.etcd_store.EtcdStore)."""

    async def create_collection(self, spec: CollectionSpec) -> int: ...
    async def get_collection(self, name: str) -> CollectionSpec | None: ...
    async def list_collections(self) -> dict[str, CollectionSpec]: ...
    async def delete_collection(self, name: str) -> bool: ...
    async def put_placement(self, collection: str, shard: int, replica: int,
                            info: Mapping[str, Any]) -> None: ...
    async def get_placements(self, collection: str) -> dict[tuple[int, int], dict[str, Any]]: ...
    async def ping(self) -> bool: ...
    async def list_members(self) -> dict[str, dict[str, Any]]: ...


class Placement(Protocol):
    def open_shard(self, spec: CollectionSpec, shard: int, replica: int) -> ShardClient: ...
    def kill_shard(self, spec: CollectionSpec, shard: int, replica: int) -> None: ...
    def open_vectorizer(self, spec: VectorizerSpec) -> VectorizerClient: ...


async def _list_page(after: str | None, limit: int, client: ShardClient, timeout_s: float
                     ) -> list[StoredObject]:
    return await client.list_objects(after, limit, False, timeout_s)


async def _delete(uuids: Sequence[str], client: ShardClient, timeout_s: float) -> list[bool]:
    return await client.delete(uuids, timeout_s)


def user_shaped(spec: CollectionSpec, vectors: Mapping[str, Any] | None
                ) -> dict[str, Any] | None:
    """Vectors in the shape users stored them: ``single`` vectors flat, multi as (n, dim)."""
    if vectors is None:
        return None
    kinds = {v.name: v.multi for v in spec.vectors}
    return {name: (m if kinds.get(name, True) or len(m) != 1 else m[0])
            for name, m in vectors.items()}


class Coordinator:
    def __init__(self, store: ClusterStore, placement: Placement, settings: Settings,
                 vectorizers: Vectorizers | None = None) -> None:
        self._store = store
        self._placement = placement
        self._settings = settings
        self._vectorizers = vectorizers or Vectorizers(placement.open_vectorizer,
                                                       settings.write_timeout_s)
        self._specs: dict[str, CollectionSpec] = {}
        # collection -> shard -> replicas (coordinator/replication.py)
        self._shards: dict[str, list[ReplicaSet]] = {}
        self._schema_lock = asyncio.Lock()
        self._quality_lock = asyncio.Lock()  # one recall report at a time
        # placement infos to (re)write to etcd: written when it answers (after an outage too)
        self._placement_info: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._placement_dirty: set[tuple[str, int, int]] = set()
        self._repair_task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every collection from the store and (re)attach its shard actors."""
        specs = await self._store.list_collections()
        for spec in specs.values():
            await self._open_collection(spec)

    async def _open_collection(self, spec: CollectionSpec) -> None:
        timeout_s = self._settings.write_timeout_s
        shards = [[self._placement.open_shard(spec, s, r)
                   for r in range(spec.replication_factor)]
                  for s in range(spec.shard_count)]
        infos = await asyncio.gather(*(c.ready(timeout_s) for reps in shards for c in reps))
        # Replicas recorded as stale (they missed writes) stay stale until caught up.
        known = await self._store.get_placements(spec.name)
        sets = [ReplicaSet.of(spec.name, s, reps) for s, reps in enumerate(shards)]
        it = iter(infos)
        for s, reps in enumerate(shards):
            for r, client in enumerate(reps):
                info = next(it)
                before = known.get((s, r), {})
                replica = sets[s].replicas[r]
                if before.get("state") == STALE:
                    replica.state = STALE
                elif info.get("data_lost") and spec.replication_factor > 1:
                    log.warning("%s", info["data_lost"])
                    replica.state = STALE  # the repair loop refills it from a ready replica
                replica.last_ok_seq = int(before.get("last_ok_seq", 0) or 0)
                self._placement_info[(spec.name, s, r)] = {
                    "actor": client.shard_id.actor_name(
                        r if spec.replication_factor > 1 else None),
                    "node_id": info.get("node_id", ""), "host": info.get("host", ""),
                    "pid": info.get("pid", 0)}
                await self._store.put_placement(spec.name, s, r,
                                                self._placement_record(spec.name, s, replica))
            sets[s].on_state_change = self._replica_state_changed
        self._specs[spec.name] = spec
        self._shards[spec.name] = sets

    def _placement_record(self, collection: str, shard: int, replica: Replica
                          ) -> dict[str, Any]:
        return {**self._placement_info.get((collection, shard, replica.index), {}),
                "state": replica.state, "last_ok_seq": replica.last_ok_seq}

    def _replica_state_changed(self, rs: ReplicaSet, replica: Replica) -> None:
        """A replica went stale or ready: mirror it into etcd, in the background (an etcd
        outage must not hold up writes; the repair loop retries)."""
        self._placement_dirty.add((rs.collection, rs.shard, replica.index))
        task = asyncio.ensure_future(self.flush_placements())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    async def flush_placements(self) -> int:
        """Write every changed placement record to etcd; returns how many are still
        pending (etcd unreachable)."""
        for key in sorted(self._placement_dirty):
            collection, shard, index = key
            sets = self._shards.get(collection)
            if sets is None or shard >= len(sets):
                self._placement_dirty.discard(key)
                continue
            replica = sets[shard].replicas[index]
            try:
                await asyncio.wait_for(self._store.put_placement(
                    collection, shard, index, self._placement_record(collection, shard,
                                                                     replica)),
                    PLACEMENT_TIMEOUT_S)
            except (ColshardError, TimeoutError) as exc:
                log.info("placement of %s:%d:%d not written yet: %s", collection, shard,
                         index, exc)
                break
            self._placement_dirty.discard(key)
        return len(self._placement_dirty)

    # ---- repair ----------------------------------------------------------------------------

    def start_background(self) -> None:
        """Start the repair loop (catch-up of stale replicas, placement rewrites)."""
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.ensure_future(self._repair_loop())

    async def stop_background(self) -> None:
        if self._repair_task is not None:
            self._repair_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._repair_task
            self._repair_task = None

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
        for name, sets in list(self._shards.items()):
            spec = self._specs[name]
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
                            replica.client = self._placement.open_shard(spec, rs.shard,
                                                                        replica.index)
                        continue
                    try:
                        stats = await rs.catch_up(replica, self._settings.write_timeout_s)
                    except ColshardError as exc:
                        log.warning("catch-up of %s:%d failed: %s", rs.name, replica.index,
                                    exc.message)
                        continue
                    if stats is not None:
                        caught[f"{name}:{rs.shard}:{replica.index}"] = stats
        if self._placement_dirty:
            await self.flush_placements()
        return caught

    # ---- schema ----------------------------------------------------------------------------

    async def create_collection(self, raw: Mapping[str, Any]) -> CollectionSpec:
        spec = CollectionSpec.from_dict(raw)
        spec = await self._fill_vectorizer_dims(spec)
        async with self._schema_lock:
            await self._store.create_collection(spec)  # AlreadyExists if present (transaction)
            try:
                await self._open_collection(spec)
            except Exception:
                log.exception("creating shards of %s failed; rolling back", spec.name)
                await self._drop_shards(spec)
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
                        f"{model_dim}", {"vector": vec.name, "dim": vec.dim,
                                         "vectorizer_dim": model_dim})
                vec = replace(vec, dim=model_dim)
            vectors.append(vec)
        return replace(spec, vectors=tuple(vectors))

    def spec(self, name: str) -> CollectionSpec:
        validate_collection_name(name)
        spec = self._specs.get(name)
        if spec is None:
            raise NotFound(f"collection {name!r} does not exist", {"collection": name})
        return spec

    async def list_collections(self) -> list[CollectionSpec]:
        return [self._specs[n] for n in sorted(self._specs)]

    async def delete_collection(self, name: str) -> None:
        async with self._schema_lock:
            spec = self.spec(name)
            # Fail fast (503) while etcd is unreachable, before any data is dropped.
            if not await self._store.ping():
                raise Unavailable(f"cannot delete collection {name!r}: etcd is unreachable",
                                  {"collection": name})
            await self._drop_shards(spec)
            self._specs.pop(name, None)
            self._shards.pop(name, None)
            self._placement_dirty = {k for k in self._placement_dirty if k[0] != name}
            for key in [k for k in self._placement_info if k[0] == name]:
                del self._placement_info[key]
            await self._store.delete_collection(name)

    async def _drop_shards(self, spec: CollectionSpec) -> None:
        for rs in self._shards.get(spec.name, []):
            for client in rs.clients():
                try:
                    await client.drop(self._settings.write_timeout_s)
                except Exception:
                    log.exception("dropping %s failed", client.shard_id)
        for s in range(spec.shard_count):
            for r in range(spec.replication_factor):
                self._placement.kill_shard(spec, s, r)

    async def describe_collection(self, name: str) -> dict[str, Any]:
        spec = self.spec(name)
        shards = self._shards[name]
        stats, failures = await gather_shards(
            {s: rs.read(lambda c, t: c.stats(t), self._settings.query_timeout_s)
             for s, rs in enumerate(shards)},
            allow_partial=True)
        return {
            "spec": spec,
            "shards": [
                {"shard": s, "replicas": len(shards[s].replicas),
                 "replica_states": [r.state for r in shards[s].replicas],
                 "stats": stats.get(s), "error": failures[s].to_dict() if s in failures else None}
                for s in range(spec.shard_count)
            ],
        }

    async def quality(self, name: str, vector: str | None = None, k: int | None = None,
                      queries: int = quality.DEFAULT_QUERIES, seed: int | None = None,
                      detail: bool = False) -> dict[str, Any]:
        """The recall report (coordinator.quality): recall@k of the search as served, per shard
        and collection-wide, measured now against exact MaxSim on sample queries."""
        spec = self.spec(name)
        vector, k = quality.check_request(spec, vector, k, queries)
        seed = int(time.time()) if seed is None else seed
        if self._quality_lock.locked():  # each one runs exact MaxSim over every object
            raise TooManyRequests("a recall report is being measured; one runs at a time, "
                                  "try again when it is done", {"collection": name})
        async with self._quality_lock:
            return await quality.measure(spec, vector, k, queries, seed, self._shards[name],
                                         self._settings.query_timeout_s, detail)

    # ---- writes ----------------------------------------------------------------------------

    async def upsert(self, collection: str, objects: Sequence[ObjectInput] | ColumnarInput,
                     api_keys: Mapping[str, str] | None = None,
                     consistency_level: str | None = None) -> list[WriteResult]:
        """Upsert a batch; each shard's part is acknowledged once ``consistency_level``
        replicas applied it (coordinator/replication.py). Objects of a shard that missed its
        quorum come back failed (``unavailable``, naming the shard); when *every* object
        failed that way the whole call raises Unavailable (503) naming the shards."""
        spec = self.spec(collection)
        level = parse_consistency(consistency_level)
        if len(objects) > self._settings.max_batch_objects:
            raise InvalidInput(
                f"batch of {len(objects)} objects exceeds the limit of "
                f"{self._settings.max_batch_objects}", {"limit": self._settings.max_batch_objects})
        if isinstance(objects, ColumnarInput):  # the Arrow import: vectors stay columnar
            if any(v.vectorizer.kind != "none" and objects.missing(v.name)
                   for v in spec.vectors):
                objects = objects.to_objects()  # some vectors are still to be computed
            else:
                return await self._write_batch(spec, prepare_columnar(spec, objects), level)
        needs = [v for v in spec.vectors if v.vectorizer.kind != "none"
                 and any(o.vectors.get(v.name) is None for o in objects)]
        if not needs:
            return await self._write_batch(spec, prepare_batch(spec, objects), level)
        return await self._upsert_vectorized(spec, objects, needs, api_keys or {}, level)

    async def _upsert_vectorized(self, spec: CollectionSpec, objects: Sequence[ObjectInput],
                                 needs: Sequence[NamedVectorSpec], api_keys: Mapping[str, str],
                                 level: ConsistencyLevel) -> list[WriteResult]:
        """Objects some of whose vectors a vectorizer computes: validated whole first (bad input
        writes nothing; ids are fixed for every object), then encoded and written
        ``VECTORIZE_CHUNK`` objects at a time, so the coordinator holds one chunk's embeddings,
        never the request's. Past the write deadline the rest is not written
        (``DeadlineExceeded``; the chunks before it are, and a retry with the same ids
        overwrites them)."""
        n_vectorize = sum(1 for o in objects if any(o.vectors.get(v.name) is None
                                                     for v in needs))
        cap = self._settings.max_vectorize_objects
        if cap and n_vectorize > cap:
            raise PayloadTooLarge(
                f"{n_vectorize} objects to vectorize in one request exceed the limit of {cap}; "
                f"split the batch", {"limit": "max_vectorize_objects", "max": cap,
                                     "got": n_vectorize})
        checked = prepare_batch(spec, objects)
        objects = [dataclasses.replace(o, uuid=oid)
                   for o, oid in zip(objects, checked.uuids, strict=True)]
        del checked
        deadline = time.monotonic() + self._settings.write_timeout_s
        results: list[WriteResult] = []
        for start in range(0, len(objects), VECTORIZE_CHUNK):
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"the write ran past its deadline after {start} of {len(objects)} objects; "
                    f"those were written, the rest were not (retrying with the same ids is "
                    f"safe)", {"written": start, "objects": len(objects)})
            part = objects[start : start + VECTORIZE_CHUNK]
            vectorized = await self._vectorizers.documents(spec, needs, part, api_keys)
            batch = prepare_batch(spec, part, vectorized=vectorized)
            del vectorized
            results += await self._write_batch(spec, batch, level, raise_unavailable=not results)
        return results

    async def _write_batch(self, spec: CollectionSpec, batch: ObjectBatch,
                           level: ConsistencyLevel, raise_unavailable: bool = True
                           ) -> list[WriteResult]:
        """Route a validated batch to its shards and write each part to its replicas. When
        every object failed for want of replicas (and ``raise_unavailable``), raise
        Unavailable naming the shards."""
        collection = spec.name
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i, oid in enumerate(batch.uuids):
            by_shard[spec.shard_for(oid)].append(i)
        shards = self._shards[collection]
        timeout_s = self._settings.write_timeout_s
        calls = {s: self._write_replicas(shards[s], batch.take(idx) if len(by_shard) > 1
                                         else batch, level, timeout_s)
                 for s, idx in by_shard.items()}
        done, failed = await gather_shards(calls, allow_partial=True)
        if (raise_unavailable and failed and not done
                and all(isinstance(e, Unavailable) for e in failed.values())):
            names = [f"{collection}:{s}" for s in sorted(failed)]
            first = failed[min(failed)]
            raise Unavailable(f"write failed on shard(s) {', '.join(names)}: {first.message}",
                              {**first.details, "shards": names})
        results: list[WriteResult | None] = [None] * len(batch)
        for s, idx in by_shard.items():
            for pos, i in enumerate(idx):
                if s in done:
                    results[i] = done[s][pos]
                else:
                    results[i] = WriteResult(batch.uuids[i], False, failed[s].to_dict())
        return [r for r in results if r is not None]

    async def _write_replicas(self, rs: ReplicaSet, batch: Any, level: ConsistencyLevel,
                              timeout_s: float) -> list[WriteResult]:
        outcome = await rs.write(lambda c, t: c.upsert(batch, t), level, timeout_s)
        result: list[WriteResult] = outcome.result
        return result

    async def delete_object(self, collection: str, uuid: str,
                            consistency_level: str | None = None) -> bool:
        spec = self.spec(collection)
        level = parse_consistency(consistency_level)
        oid = normalize_uuid(uuid)
        rs = self._shards[collection][spec.shard_for(oid)]
        outcome = await rs.write(lambda c, t: c.delete([oid], t), level,
                                 self._settings.write_timeout_s)
        return bool(outcome.result[0])

    async def delete_where(self, collection: str, raw_filter: Mapping[str, Any],
                           dry_run: bool = False, consistency_level: str | None = None
                           ) -> dict[str, Any]:
        """Delete every object matching a filter. Each shard is paged through by id and the
        filter is evaluated on the properties, so the cost is one pass over the collection."""
        spec = self.spec(collection)
        level = parse_consistency(consistency_level)
        filt = self._parse_filter(spec, raw_filter)
        timeout_s = self._settings.write_timeout_s
        matched = deleted = 0
        for s, rs in enumerate(self._shards[collection]):
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

    # ---- reads -----------------------------------------------------------------------------

    def _replicas(self, collection: str, shard: int) -> ReplicaSet:
        return self._shards[collection][shard]

    def _query_timeout(self, requested: float | None) -> float:
        """The query deadline: the request's ``timeout`` within (0, max_query_timeout_s], or
        the configured default."""
        if requested is None:
            return self._settings.query_timeout_s
        cap = max(self._settings.query_timeout_s, MAX_QUERY_TIMEOUT_S)
        if not 0 < requested <= cap:
            raise InvalidInput(f"timeout must be in (0, {cap:g}] seconds",
                               {"timeout": requested})
        return float(requested)

    async def get_object(self, collection: str, uuid: str, include_vector: bool) -> StoredObject:
        spec = self.spec(collection)
        oid = normalize_uuid(uuid)
        rs = self._replicas(collection, spec.shard_for(oid))
        obj = await rs.read(lambda c, t: c.get(oid, include_vector, t),
                            self._settings.query_timeout_s)
        if obj is None:
            raise NotFound(f"object {oid} not found in {collection!r}",
                           {"collection": collection, "id": oid})
        return replace(obj, vectors=user_shaped(spec, obj.vectors))

    async def list_objects(self, collection: str, after: str | None, limit: int,
                           include_vector: bool) -> list[StoredObject]:
        spec = self.spec(collection)
        cursor = normalize_uuid(after) if after else None
        self._check_limit(limit, 0)
        pages, _ = await gather_shards(
            {s: self._replicas(collection, s).read(
                lambda c, t: c.list_objects(cursor, limit, include_vector, t),
                self._settings.query_timeout_s)
             for s in range(spec.shard_count)}, allow_partial=False)
        merged = sorted((o for page in pages.values() for o in page), key=lambda o: o.uuid)
        return [replace(o, vectors=user_shaped(spec, o.vectors)) for o in merged[:limit]]

    def _check_limit(self, limit: int, offset: int) -> None:
        cap = self._settings.max_limit
        if not 0 < limit <= cap:
            raise InvalidInput(f"limit must be in 1..{cap}", {"limit": limit})
        if not 0 <= offset <= cap:
            raise InvalidInput(f"offset must be in 0..{cap}", {"offset": offset})

    async def query(self, req: QueryRequest) -> QueryResult:
        start = time.perf_counter()
        timeout_s = self._query_timeout(req.timeout_s)
        token = _DEADLINE.set(asyncio.get_running_loop().time() + timeout_s)
        try:
            return await self._query(req, start)
        finally:
            _DEADLINE.reset(token)

    def _remaining(self, req: QueryRequest) -> float:
        """Seconds left of the running query's deadline (DeadlineExceeded if none)."""
        deadline = _DEADLINE.get()
        if deadline is None:
            return self._query_timeout(req.timeout_s)
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise DeadlineExceeded("the query's deadline passed before the shards were asked",
                                   {"collection": req.collection})
        return remaining

    async def _query(self, req: QueryRequest, start: float) -> QueryResult:
        spec = self.spec(req.collection)
        kind = req.kind()
        self._check_limit(req.limit, req.offset)
        if req.return_properties is not None:
            for name in req.return_properties:
                spec.property(name)
        filt = self._parse_filter(spec, req.filters)
        page = req.offset + req.limit
        if kind == "near_vector":
            query = prepare_query_vector(spec, req.target_vector, req.near_vector)
            hits, missing = await self._vector_hits(spec, req, query, filt, page)
            objects = [self._result(spec, req, h) for h in hits[req.offset :]]
        elif kind == "near_text":
            assert req.near_text is not None
            query = await self._vectorize_query(spec, req, req.near_text)
            hits, missing = await self._vector_hits(spec, req, query, filt, page)
            objects = [self._result(spec, req, h) for h in hits[req.offset :]]
        elif kind == "bm25":
            assert req.bm25 is not None
            hits, missing = await self._keyword_hits(spec, req, req.bm25.query,
                                                     req.bm25.properties, filt, page)
            objects = [self._result(spec, req, h) for h in hits[req.offset :]]
        else:
            objects, missing = await self._hybrid(spec, req, filt)
        return QueryResult(tuple(objects), tuple(sorted(missing)), time.perf_counter() - start)

    async def _vectorize_query(self, spec: CollectionSpec, req: QueryRequest, text: str) -> Any:
        vec = spec.vector(req.target_vector)
        if vec.vectorizer.kind == "none":
            raise InvalidInput(
                f"vector {vec.name!r} has no vectorizer: use near_vector (or hybrid with "
                "a vector)", {"vector": vec.name})
        matrix = await self._vectorizers.query(vec, text, req.api_keys)
        return prepare_query_vector(spec, vec.name, matrix)

    async def _keyword_hits(self, spec: CollectionSpec, req: QueryRequest, text: str,
                            properties: tuple[str, ...] | None, filt: Any, k: int
                            ) -> tuple[list[Hit], list[int]]:
        searchable = {p.name for p in spec.properties
                      if p.searchable and p.data_type in ("text", "text[]")}
        for name in properties or ():
            spec.property(name)  # NotFound for unknown names
            if name not in searchable:
                raise InvalidInput(f"property {name!r} is not a searchable text property",
                                   {"property": name})
        if not searchable:
            raise InvalidInput(f"collection {spec.name!r} has no searchable text properties")
        search = KeywordSearch(query=text, k=k, properties=properties, filter=filt,
                               return_properties=req.return_properties,
                               include_vectors=req.include_vector)
        timeout_s = self._remaining(req)
        results, failed = await gather_shards(
            {s: self._replicas(spec.name, s).read(lambda c, t: c.keyword_search(search, t),
                                                  timeout_s)
             for s in range(spec.shard_count)}, allow_partial=req.partial)
        return merge_top_k((r.hits for r in results.values()), 0, k), list(failed)

    async def _hybrid(self, spec: CollectionSpec, req: QueryRequest, filt: Any
                      ) -> tuple[list[ResultObject], list[int]]:
        hybrid = req.hybrid
        assert hybrid is not None
        # Each side contributes a deeper list than the page, so fusion can reorder across it.
        k = max(req.offset + req.limit, HYBRID_MIN_CANDIDATES)
        vector_hits: list[Hit] = []
        keyword_hits: list[Hit] = []
        missing: set[int] = set()
        if hybrid.alpha > 0:
            if hybrid.vector is not None:
                query = prepare_query_vector(spec, req.target_vector, hybrid.vector)
            else:
                query = await self._vectorize_query(spec, req, hybrid.query)
            vector_hits, failed = await self._vector_hits(spec, req, query, filt, k)
            missing.update(failed)
        if hybrid.alpha < 1:
            keyword_hits, failed = await self._keyword_hits(spec, req, hybrid.query,
                                                            hybrid.properties, filt, k)
            missing.update(failed)
        fused = fuse([(h.uuid, h.score) for h in keyword_hits],
                     [(h.uuid, h.score) for h in vector_hits], alpha=hybrid.alpha,
                     fusion=hybrid.fusion, offset=req.offset, limit=req.limit)
        by_id = {h.uuid: h for h in keyword_hits}
        by_id.update({h.uuid: h for h in vector_hits})
        objects = []
        for f in fused:
            explain = None
            if "explain" in req.return_metadata:
                explain = {"keyword_score": f.keyword_score, "keyword_rank": f.keyword_rank,
                           "vector_score": f.vector_score, "vector_rank": f.vector_rank,
                           "fusion": hybrid.fusion, "alpha": hybrid.alpha}
            hit = replace(by_id[f.uuid], score=f.score, explain=explain)
            objects.append(self._result(spec, req, hit))
        return objects, sorted(missing)

    def _parse_filter(self, spec: CollectionSpec, raw: Mapping[str, Any] | None) -> Any:
        if raw is None:
            return None
        from cluster.filters import parse_filter

        return parse_filter(raw, spec, self._settings.max_filter_depth)

    async def _vector_hits(self, spec: CollectionSpec, req: QueryRequest, query: Any,
                           filt: Any, k: int) -> tuple[list[Hit], list[int]]:
        """The global top ``k`` (offset not applied) and the shards that failed."""
        vec = spec.vector(req.target_vector)
        search = VectorSearch(
            target_vector=vec.name, query=query, k=k, filter=filt,
            return_properties=req.return_properties, include_vectors=req.include_vector,
            explain="explain" in req.return_metadata, exact=req.exact)
        timeout_s = self._remaining(req)
        results, failed = await gather_shards(
            {s: self._replicas(spec.name, s).read(lambda c, t: c.search(search, t), timeout_s)
             for s in range(spec.shard_count)}, allow_partial=req.partial)
        return merge_top_k((r.hits for r in results.values()), 0, k), list(failed)

    def _result(self, spec: CollectionSpec, req: QueryRequest, hit: Hit,
                extra: Mapping[str, Any] | None = None) -> ResultObject:
        metadata: dict[str, Any] = {}
        if "score" in req.return_metadata:
            metadata["score"] = hit.score
        if "distance" in req.return_metadata:
            metadata["distance"] = -hit.score
        if "explain" in req.return_metadata and hit.explain is not None:
            metadata["explain"] = dict(hit.explain)
        if extra:
            metadata.update(extra)
        return ResultObject(hit.uuid, hit.properties, metadata, user_shaped(spec, hit.vectors))

    # ---- cluster ---------------------------------------------------------------------------

    def shard_clients(self) -> dict[str, list[list[ShardClient]]]:
        """collection -> shard -> replica clients (a copy of the routing table), for the
        membership monitor (coordinator.membership)."""
        return {name: [rs.clients() for rs in sets] for name, sets in self._shards.items()}

    async def cluster_info(self) -> dict[str, Any]:
        collections: dict[str, Any] = {}
        for name, spec in sorted(self._specs.items()):
            placements = await self._store.get_placements(name)
            collections[name] = {
                "shard_count": spec.shard_count,
                "replication_factor": spec.replication_factor,
                "placements": [{"shard": s, "replica": r, **info}
                               for (s, r), info in sorted(placements.items())],
            }
        return {"members": await self._store.list_members(), "collections": collections}

    async def readiness(self) -> dict[str, Any]:
        """etcd reachable and every shard of every collection has a replica that answers and
        holds its data."""
        etcd_ok = False
        try:
            etcd_ok = await self._store.ping()
        except Unavailable:
            etcd_ok = False
        unplaced: list[str] = []
        for name, shards in self._shards.items():
            _, failed = await gather_shards(
                {s: rs.read(_serving_ready, 5.0) for s, rs in enumerate(shards)},
                allow_partial=True)
            unplaced += [f"{name}:{s}" for s in failed]
        return {"ready": etcd_ok and not unplaced, "etcd": etcd_ok, "unavailable_shards": unplaced}


async def _serving_ready(client: ShardClient, timeout_s: float) -> Mapping[str, Any]:
    """``ready()``, counting a replica restarted without its data as not serving."""
    info = await client.ready(timeout_s)
    if info.get("data_lost"):
        raise DataLost(str(info["data_lost"]), {"shard": str(client.shard_id)})
    return info
