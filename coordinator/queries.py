"""Reads: query planning, fan-out and result shaping (near_vector, near_text, bm25, hybrid;
get and list objects).

Each read takes the routing table once (``coordinator.routing.Router.table``) and plans, fans
out and shapes its result from that one snapshot: the collection's spec and its shards' replica
sets come from the same version, whatever changes meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from cluster import limits
from cluster.errors import DeadlineExceeded, InvalidInput, NotFound
from cluster.ids import normalize_uuid, validate_collection_name
from cluster.query import QueryRequest, QueryResult, ResultObject
from cluster.settings import Settings
from cluster.spec import CollectionSpec
from cluster.types import Hit, KeywordSearch, StoredObject, VectorSearch
from cluster.validation import prepare_query_vector
from coordinator.fanout import gather_shards
from coordinator.fusion import fuse
from coordinator.merge import merge_top_k
from coordinator.replication import ReplicaSet
from coordinator.routing import Router, RoutingTable
from coordinator.vectorize import Vectorizers

HYBRID_MIN_CANDIDATES = 100
MAX_QUERY_TIMEOUT_S = 300.0
# The running query's deadline (loop time); shard calls get what is left of it.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "colshard_deadline", default=None
)
Shards = Sequence[ReplicaSet]  # one collection's shards, from one snapshot


def target(table: RoutingTable, name: str) -> tuple[CollectionSpec, Shards]:
    """Collection ``name``'s spec and shards, from the one snapshot ``table``."""
    return spec_in(table, name), table.shard_sets(name)


def spec_in(table: RoutingTable, name: str) -> CollectionSpec:
    """The spec of collection ``name`` in ``table``; NotFound when it is not served."""
    validate_collection_name(name)
    spec = table.spec(name)
    if spec is None:
        raise NotFound(f"collection {name!r} does not exist", {"collection": name})
    return spec


def parse_filter(spec: CollectionSpec, raw: Mapping[str, Any] | None, settings: Settings) -> Any:
    """A request's ``filters`` parsed against the schema (None: no filter)."""
    if raw is None:
        return None
    from cluster.filters import parse_filter as parse

    return parse(raw, spec, settings.max_filter_depth)


def user_shaped(spec: CollectionSpec, vectors: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Vectors in the shape users stored them: ``single`` vectors flat, multi as (n, dim)."""
    if vectors is None:
        return None
    kinds = {v.name: v.multi for v in spec.vectors}
    return {
        name: (m if kinds.get(name, True) or len(m) != 1 else m[0]) for name, m in vectors.items()
    }


class Reads:
    """The coordinator's read verbs over the router's current snapshot."""

    def __init__(self, router: Router, settings: Settings, vectorizers: Vectorizers) -> None:
        self._router = router
        self._settings = settings
        self._vectorizers = vectorizers

    def _read(self, collection: str) -> tuple[CollectionSpec, Shards]:
        return target(self._router.table, collection)

    def _query_timeout(self, requested: float | None) -> float:
        """The query deadline: the request's ``timeout`` within (0, max_query_timeout_s], or
        the configured default."""
        if requested is None:
            return self._settings.query_timeout_s
        cap = max(self._settings.query_timeout_s, MAX_QUERY_TIMEOUT_S)
        if not 0 < requested <= cap:
            raise InvalidInput(f"timeout must be in (0, {cap:g}] seconds", {"timeout": requested})
        return float(requested)

    async def get_object(self, collection: str, uuid: str, include_vector: bool) -> StoredObject:
        spec, sets = self._read(collection)
        oid = normalize_uuid(uuid)
        rs = sets[spec.shard_for(oid)]
        obj = await rs.read(
            lambda c, t: c.get(oid, include_vector, t), self._settings.query_timeout_s
        )
        if obj is None:
            raise NotFound(
                f"object {oid} not found in {collection!r}", {"collection": collection, "id": oid}
            )
        return replace(obj, vectors=user_shaped(spec, obj.vectors))

    async def list_objects(
        self, collection: str, after: str | None, limit: int, include_vector: bool
    ) -> list[StoredObject]:
        spec, sets = self._read(collection)
        cursor = normalize_uuid(after) if after else None
        self._check_limit(limit, 0)
        pages, _ = await gather_shards(
            {
                s: sets[s].read(
                    lambda c, t: c.list_objects(cursor, limit, include_vector, t),
                    self._settings.query_timeout_s,
                )
                for s in range(spec.shard_count)
            },
            allow_partial=False,
        )
        merged = sorted((o for page in pages.values() for o in page), key=lambda o: o.uuid)
        return [replace(o, vectors=user_shaped(spec, o.vectors)) for o in merged[:limit]]

    def _check_limit(self, limit: int, offset: int) -> None:
        limits.check_page(limit, offset, self._settings)

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
            raise DeadlineExceeded(
                "the query's deadline passed before the shards were asked",
                {"collection": req.collection},
            )
        return remaining

    async def _query(self, req: QueryRequest, start: float) -> QueryResult:
        spec, sets = self._read(req.collection)
        kind = req.kind()
        self._check_limit(req.limit, req.offset)
        if req.return_properties is not None:
            for name in req.return_properties:
                spec.property(name)
        filt = self._parse_filter(spec, req.filters)
        page = req.offset + req.limit
        if kind == "near_vector":
            query = prepare_query_vector(spec, req.target_vector, req.near_vector)
            hits, missing = await self._vector_hits(spec, sets, req, query, filt, page)
            objects = [self._result(spec, req, h) for h in hits[req.offset :]]
        elif kind == "near_text":
            assert req.near_text is not None
            query = await self._vectorize_query(spec, req, req.near_text)
            hits, missing = await self._vector_hits(spec, sets, req, query, filt, page)
            objects = [self._result(spec, req, h) for h in hits[req.offset :]]
        elif kind == "bm25":
            assert req.bm25 is not None
            hits, missing = await self._keyword_hits(
                spec, sets, req, req.bm25.query, req.bm25.properties, filt, page
            )
            objects = [self._result(spec, req, h) for h in hits[req.offset :]]
        else:
            objects, missing = await self._hybrid(spec, sets, req, filt)
        return QueryResult(tuple(objects), tuple(sorted(missing)), time.perf_counter() - start)

    async def _vectorize_query(self, spec: CollectionSpec, req: QueryRequest, text: str) -> Any:
        vec = spec.vector(req.target_vector)
        if vec.vectorizer.kind == "none":
            raise InvalidInput(
                f"vector {vec.name!r} has no vectorizer: use near_vector (or hybrid with a vector)",
                {"vector": vec.name},
            )
        matrix = await self._vectorizers.query(vec, text, req.api_keys)
        return prepare_query_vector(spec, vec.name, matrix)

    async def _keyword_hits(
        self,
        spec: CollectionSpec,
        sets: Shards,
        req: QueryRequest,
        text: str,
        properties: tuple[str, ...] | None,
        filt: Any,
        k: int,
    ) -> tuple[list[Hit], list[int]]:
        searchable = {
            p.name for p in spec.properties if p.searchable and p.data_type in ("text", "text[]")
        }
        for name in properties or ():
            spec.property(name)  # NotFound for unknown names
            if name not in searchable:
                raise InvalidInput(
                    f"property {name!r} is not a searchable text property", {"property": name}
                )
        if not searchable:
            raise InvalidInput(f"collection {spec.name!r} has no searchable text properties")
        search = KeywordSearch(
            query=text,
            k=k,
            properties=properties,
            filter=filt,
            return_properties=req.return_properties,
            include_vectors=req.include_vector,
        )
        timeout_s = self._remaining(req)
        results, failed = await gather_shards(
            {
                s: sets[s].read(lambda c, t: c.keyword_search(search, t), timeout_s)
                for s in range(spec.shard_count)
            },
            allow_partial=req.partial,
        )
        return merge_top_k((r.hits for r in results.values()), 0, k), list(failed)

    async def _hybrid(
        self, spec: CollectionSpec, sets: Shards, req: QueryRequest, filt: Any
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
            vector_hits, failed = await self._vector_hits(spec, sets, req, query, filt, k)
            missing.update(failed)
        if hybrid.alpha < 1:
            keyword_hits, failed = await self._keyword_hits(
                spec, sets, req, hybrid.query, hybrid.properties, filt, k
            )
            missing.update(failed)
        fused = fuse(
            [(h.uuid, h.score) for h in keyword_hits],
            [(h.uuid, h.score) for h in vector_hits],
            alpha=hybrid.alpha,
            fusion=hybrid.fusion,
            offset=req.offset,
            limit=req.limit,
        )
        by_id = {h.uuid: h for h in keyword_hits}
        by_id.update({h.uuid: h for h in vector_hits})
        objects = []
        for f in fused:
            explain = None
            if "explain" in req.return_metadata:
                explain = {
                    "keyword_score": f.keyword_score,
                    "keyword_rank": f.keyword_rank,
                    "vector_score": f.vector_score,
                    "vector_rank": f.vector_rank,
                    "fusion": hybrid.fusion,
                    "alpha": hybrid.alpha,
                }
            hit = replace(by_id[f.uuid], score=f.score, explain=explain)
            objects.append(self._result(spec, req, hit))
        return objects, sorted(missing)

    def _parse_filter(self, spec: CollectionSpec, raw: Mapping[str, Any] | None) -> Any:
        return parse_filter(spec, raw, self._settings)

    async def _vector_hits(
        self, spec: CollectionSpec, sets: Shards, req: QueryRequest, query: Any, filt: Any, k: int
    ) -> tuple[list[Hit], list[int]]:
        """The global top ``k`` (offset not applied) and the shards that failed."""
        vec = spec.vector(req.target_vector)
        search = VectorSearch(
            target_vector=vec.name,
            query=query,
            k=k,
            filter=filt,
            return_properties=req.return_properties,
            include_vectors=req.include_vector,
            explain="explain" in req.return_metadata,
            exact=req.exact,
        )
        timeout_s = self._remaining(req)
        results, failed = await gather_shards(
            {
                s: sets[s].read(lambda c, t: c.search(search, t), timeout_s)
                for s in range(spec.shard_count)
            },
            allow_partial=req.partial,
        )
        return merge_top_k((r.hits for r in results.values()), 0, k), list(failed)

    def _result(
        self,
        spec: CollectionSpec,
        req: QueryRequest,
        hit: Hit,
        extra: Mapping[str, Any] | None = None,
    ) -> ResultObject:
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
