"""The FastAPI gateway: HTTP wire schema in, coordinator calls out, one error shape back.

Stateless: it holds no shard data and no routing state, only a ``Backend`` to the coordinator,
so any number of replicas can run behind a load balancer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from dataclasses import asdict
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import limits, vector_wire
from cluster.errors import (
    BadRequest,
    ColshardError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    error_from_dict,
)
from cluster.ids import validate_collection_name
from cluster.query import Bm25Query, HybridQuery, QueryRequest, QueryResult
from cluster.settings import Settings
from cluster.spec import CollectionSpec
from cluster.timing import QUERY_ANSWER_MARGIN_S, READINESS_TIMEOUT_S
from cluster.types import StoredObject, WriteResult
from cluster.validation import ObjectInput
from gateway import wire
from gateway.auth import ApiKey, ApiKeyAuth, KeyTable, check_collection, principal
from gateway.backend import Backend
from gateway.errors import error_body, status_for

log = logging.getLogger(__name__)
ARROW_STREAM = "application/vnd.apache.arrow.stream"
HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# An over-limit body is read and discarded up to this many bytes before the 413 goes out, so
# that a client which sends its whole body before reading (urllib, curl without Expect: 100-
# continue) gets the 413 instead of a broken pipe. Beyond it the connection is closed after the
# 413. A client that sends ``Expect: 100-continue`` gets the 413 without sending its body.
DISCARD_MAX_BYTES = 256 * 1024 * 1024


class BodyLimit:
    """Reject bodies over ``max_bytes`` with 413 before they are parsed (Content-Length or the
    streamed byte count, whichever shows it first)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if not _expects_continue(headers) and int(declared) <= DISCARD_MAX_BYTES:
                await _discard(receive, int(declared))
            await self._reject(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body", False):
                        await _discard(receive, DISCARD_MAX_BYTES - seen)
                    raise PayloadTooLarge(
                        f"request body exceeds {self.max_bytes} bytes",
                        {"max_bytes": self.max_bytes},
                    )
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, send: Send) -> None:
        exc = PayloadTooLarge(
            f"request body exceeds {self.max_bytes} bytes", {"max_bytes": self.max_bytes}
        )
        response = JSONResponse(error_body(exc), status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def _expects_continue(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"expect", b"").lower() == b"100-continue"


async def _discard(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a request body, at most ``budget`` bytes (none kept)."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def read_body(request: Request, max_bytes: int) -> bytes | memoryview:
    """The request body. With a Content-Length within ``max_bytes`` (what the SDK sends), the
    chunks are copied into one buffer of that size as they arrive instead of being kept in a
    list and joined at the end (Starlette's ``Request.body``): for a 32 MB Arrow import body,
    one full copy into fresh memory and 32 MB of peak memory less."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    if not 0 < size <= max_bytes:
        return await request.body()
    view = np.empty(size, dtype=np.uint8).data  # not zeroed: the bytes below overwrite it
    pos = 0
    overflow: list[bytes] = []  # beyond the declared length (the server's parser forbids it)
    async for chunk in request.stream():
        n = len(chunk)
        if not overflow and pos + n <= size:
            view[pos : pos + n] = chunk
            pos += n
        else:
            overflow.append(chunk)
    if overflow:
        return b"".join([view[:pos], *overflow])
    return view[:pos]


class FastJSONResponse(JSONResponse):
    """``JSONResponse`` encoded with orjson (compact UTF-8 like Starlette's); anything orjson
    does not take (integers beyond 64 bits, ...) goes through Starlette's encoder."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:
            return super().render(content)


class FastJSONRequest(Request):
    """A request whose JSON body is parsed by orjson (a 32x128 query matrix: 0.1 ms instead
    of 1.3 ms). What orjson refuses (NaN/Infinity literals, non-UTF-8 encodings, integers
    beyond 64 bits) is parsed by the standard library as before, so the same bodies are
    accepted and the same ones rejected."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._json = json.loads(body)
                # The standard library takes "\ud800" (a lone surrogate): no valid text, and
                # it would fail later (etcd, the index, the answer) as a 500. orjson, the
                # insert route's pydantic parser and this all refuse it the same way: 400.
                _reject_lone_surrogates(self._json)
        return self._json


def _reject_lone_surrogates(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(
                    "invalid JSON: a string holds a lone UTF-16 surrogate (not valid Unicode text)",
                    {},
                ) from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class FastJSONRoute(APIRoute):
    """Routes that hand their endpoint a ``FastJSONRequest``: FastAPI's validation, error
    locations and OpenAPI schema are unchanged, only the JSON decoder differs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(FastJSONRequest(request.scope, request.receive))

        return route_handler


class Observe:
    """Request count and latency per (method, route, status): a plain ASGI middleware (the
    ``@app.middleware`` kind runs every request through extra tasks and streams)."""

    def __init__(self, app: ASGIApp, requests_total: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests_total = requests_total
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def observed_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except ColshardError as exc:  # raised inside the body-limit receive wrapper
            if started:
                raise
            response = JSONResponse(error_body(exc), status_code=status_for(exc))
            await response(scope, receive, observed_send)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            # Bounded label values: clients choose the method string.
            method = scope.get("method", "")
            method = method if method in HTTP_METHODS else "other"
            self.requests_total.labels(method, path, str(status)).inc()
            self.latency.labels(method, path).observe(time.perf_counter() - start)


def _matrix_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _vectors_out(vectors: Any) -> dict[str, Any] | None:
    if vectors is None:
        return None
    return {name: _matrix_list(v) for name, v in vectors.items()}


def _array_or_raw(value: Any, what: str) -> Any:
    """``value`` as a numpy array when it converts, so the limit check reads its shape and
    ``_to_array`` does not convert the lists again; else unchanged (``_to_array`` then rejects
    it with its own message, after the limit checks, as before). A binary-form vector
    (``cluster.vector_wire``) is decoded, or rejected at once when malformed."""
    if value is None:
        return None
    if vector_wire.is_encoded(value):
        return vector_wire.decode(value, what)
    try:
        return np.asarray(value)
    except (ValueError, TypeError):
        return value


def _to_array(value: Any, what: str) -> Any:
    """Structural check only (rectangular numbers); dims are checked against the spec later."""
    if value is None:
        return None
    if vector_wire.is_encoded(value):
        return vector_wire.decode(value, what)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"{what}: not a rectangular numeric vector or matrix (ragged rows?)", {"vector": what}
        ) from exc
    if array.dtype.kind not in "iuf":
        raise InvalidInput(f"{what}: a vector holds numbers only", {"vector": what})
    # Out-of-range values become inf here and are rejected with the NaN/Inf check later.
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(np.float32, copy=False)


def object_out(collection: str, obj: StoredObject) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": obj.uuid,
        "collection": collection,
        "properties": dict(obj.properties),
    }
    if obj.vectors is not None:
        out["vectors"] = _vectors_out(obj.vectors)
        if obj.lossy:  # decoded from a lossy codec that keeps no originals
            out["vectors_lossy"] = sorted(obj.lossy)
    return out


def batch_out(results: list[WriteResult]) -> dict[str, Any]:
    rows = [
        {
            "id": r.uuid,
            "status": "SUCCESS" if r.ok else "FAILED",
            "error": dict(r.error) if r.error else None,
        }
        for r in results
    ]
    n_ok = sum(1 for r in results if r.ok)
    return {"results": rows, "n_ok": n_ok, "n_failed": len(results) - n_ok}


def query_out(result: QueryResult) -> dict[str, Any]:
    objects = []
    for o in result.objects:
        item: dict[str, Any] = {
            "id": o.uuid,
            "properties": dict(o.properties),
            "metadata": dict(o.metadata),
        }
        if o.vectors is not None:
            item["vectors"] = _vectors_out(o.vectors)
        objects.append(item)
    return {
        "objects": objects,
        "partial": bool(result.missing_shards),
        "missing_shards": list(result.missing_shards),
        "took_ms": round(result.took_s * 1000.0, 3),
    }


def api_keys_from(request: Request) -> dict[str, str]:
    keys = {}
    # Weaviate's clients send X-JinaAI-Api-Key; Jina's own docs say X-Jina-Api-Key.
    jina = request.headers.get("x-jinaai-api-key") or request.headers.get("x-jina-api-key")
    if jina:
        keys["jinaai"] = jina
    return keys


def create_app(backend: Backend, settings: Settings, api_keys: Iterable[ApiKey] = ()) -> FastAPI:
    """The HTTP app. With ``api_keys`` every route but the open ones needs a key
    (``gateway/auth.py``); without, auth is off."""
    keys = KeyTable(api_keys)
    app = FastAPI(
        title="colshard",
        version="0.1.0",
        description="Distributed multi-vector (late-interaction, MaxSim) search. "
        'Errors: {"error": {"code", "message", "details"}}.',
        responses={
            400: {"model": wire.ErrorOut},
            401: {"model": wire.ErrorOut},
            403: {"model": wire.ErrorOut},
            404: {"model": wire.ErrorOut},
            409: {"model": wire.ErrorOut},
            413: {"model": wire.ErrorOut},
            422: {"model": wire.ErrorOut},
            503: {"model": wire.ErrorOut},
            504: {"model": wire.ErrorOut},
            507: {"model": wire.ErrorOut},
        },
    )
    app.router.route_class = FastJSONRoute  # before any route is added
    registry = CollectorRegistry()
    requests_total = Counter(
        "colshard_http_requests_total",
        "HTTP requests",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "colshard_http_request_seconds",
        "HTTP request latency",
        ["method", "route"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    auth_rejections = Counter(
        "colshard_http_auth_rejections_total",
        "Requests rejected by API-key auth",
        ["status"],
        registry=registry,
    )

    app.add_middleware(
        Observe,
        requests_total=requests_total,  # type: ignore[arg-type]
        latency=latency,
    )

    @app.exception_handler(ColshardError)
    async def colshard_error(_: Request, exc: ColshardError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=status_for(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors (unparseable body, unknown route, wrong method) in our shape.
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail), "details": {}}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_errors_to_colshard(list(exc.errors()))
        return JSONResponse(error_body(err), status_code=status_for(err))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = {"error": {"code": "internal", "message": "internal error", "details": {}}}
        return JSONResponse(body, status_code=500)

    # ---- health & ops ----------------------------------------------------------------------

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        try:
            state = await backend.readiness(timeout_s=READINESS_TIMEOUT_S)
        except ColshardError as exc:
            return JSONResponse({"ready": False, "error": exc.to_dict()}, status_code=503)
        return JSONResponse(state, status_code=200 if state.get("ready") else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/cluster", tags=["ops"])
    async def cluster() -> dict[str, Any]:
        info: dict[str, Any] = await backend.cluster_info()
        return info

    # ---- collections -----------------------------------------------------------------------

    @app.post("/v1/collections", status_code=201, tags=["collections"])
    async def create_collection(body: wire.CollectionCreate, request: Request) -> dict[str, Any]:
        check_collection(principal(request), body.name)
        raw_spec = body.to_spec_dict()
        limits.check_collection(raw_spec, settings)
        spec: CollectionSpec = await backend.create_collection(
            raw_spec, timeout_s=settings.write_timeout_s
        )
        return spec.to_dict()

    @app.get("/v1/collections", tags=["collections"])
    async def list_collections(request: Request) -> dict[str, Any]:
        specs: list[CollectionSpec] = await backend.list_collections()
        key = principal(request)
        if key is not None:
            specs = [s for s in specs if key.may_access(s.name)]
        return {"collections": [s.to_dict() for s in specs]}

    @app.get("/v1/collections/{name}", tags=["collections"])
    async def get_collection(name: str) -> dict[str, Any]:
        info = await backend.describe_collection(name)
        shards = [
            {**s, "stats": asdict(s["stats"]) if s["stats"] is not None else None}
            for s in info["shards"]
        ]
        return {**info["spec"].to_dict(), "shards": shards}

    @app.get("/v1/collections/{name}/quality", tags=["collections"])
    async def collection_quality(
        name: str,
        vector: str | None = Query(
            None, description="named vector (needed when the collection has several)"
        ),
        k: int | None = Query(None, description="recall@k (default: the vector's recall_k)"),
        queries: int = Query(50, description="sample queries (1..500)"),
        seed: int | None = Query(None, description="sample seed (default: the time)"),
        detail: bool = Query(
            False, description="also every sample query, its served and exact top k and its recall"
        ),
    ) -> dict[str, Any]:
        """Recall@k of the search as served, measured now per shard and collection-wide
        against exact MaxSim on sample queries (recent real queries, else queries made from
        stored objects), with one-sided 95 % bounds and each shard's calibration. Costly
        (exact MaxSim over every object per query): one runs at a time (429 otherwise)."""
        report: dict[str, Any] = await backend.quality(
            name, vector, k, queries, seed, detail, timeout_s=settings.write_timeout_s
        )
        return report

    @app.delete("/v1/collections/{name}", tags=["collections"])
    async def delete_collection(name: str) -> dict[str, Any]:
        await backend.delete_collection(name, timeout_s=settings.write_timeout_s)
        return {"deleted": name}

    # ---- backups (admin) ---------------------------------------------------------------------

    @app.post(
        "/v1/backups",
        tags=["backups"],
        status_code=201,
        responses={202: {"description": "started (wait: false)"}},
    )
    async def create_backup(body: wire.BackupIn) -> JSONResponse:
        """A consistent copy of the collections (each one cut while none of its writes is in
        flight) under the server's backup directory: 201 when it is written, or with
        ``wait: false`` 202 once it has started. One backup or restore at a time (429
        otherwise); an id that exists is 409."""
        info: dict[str, Any] = await backend.backup(
            body.id,
            body.collections,
            body.wait,
            timeout_s=settings.backup_timeout_s if body.wait else settings.write_timeout_s,
        )
        return FastJSONResponse(info, status_code=201 if body.wait else 202)

    @app.get("/v1/backups", tags=["backups"])
    async def list_backups() -> dict[str, Any]:
        return {"backups": await backend.list_backups()}

    @app.get("/v1/backups/{backup_id}", tags=["backups"])
    async def get_backup(backup_id: str) -> dict[str, Any]:
        """A backup's state (running, done, failed), its collections, specs and sizes."""
        info: dict[str, Any] = await backend.get_backup(backup_id)
        return info

    @app.delete("/v1/backups/{backup_id}", tags=["backups"])
    async def delete_backup(backup_id: str) -> dict[str, Any]:
        await backend.delete_backup(backup_id)
        return {"deleted": backup_id}

    @app.post("/v1/backups/{backup_id}/restore", tags=["backups"], status_code=201)
    async def restore_backup(backup_id: str, body: wire.RestoreIn) -> dict[str, Any]:
        """Create collection ``name`` (default: the backed-up one's own name; 409 if it
        exists) from the backup's copy of ``collection``, with exactly the writes acknowledged
        before the backup's cut."""
        if body.name is not None:
            validate_collection_name(body.name)
        out: dict[str, Any] = await backend.restore(
            backup_id, body.collection, body.name, timeout_s=settings.write_timeout_s
        )
        return out

    # ---- shard moves and node drains (admin) -------------------------------------------------

    @app.post("/v1/collections/{name}/shards/{shard}/move", tags=["operations"])
    async def move_replica(name: str, shard: int, body: wire.MoveIn) -> dict[str, Any]:
        """Move one replica of the shard to another node while it serves: its data is copied
        there, then the writes made meanwhile (writes to the shard wait for this second
        pass), then routing switches to the new copy at once and the old copy is deleted.
        One move per shard at a time (429); nothing acknowledged is lost."""
        out: dict[str, Any] = await backend.move_replica(
            name, shard, body.replica, body.to_node, timeout_s=settings.backup_timeout_s
        )
        return out

    @app.post("/v1/cluster/nodes/{node_id}/drain", tags=["operations"])
    async def drain_node(node_id: str) -> dict[str, Any]:
        """Place no new replica on the node and move every replica on it to other nodes, one
        after the other; what moved, what could not (and why), how many are left."""
        out: dict[str, Any] = await backend.drain_node(node_id, timeout_s=settings.backup_timeout_s)
        return out

    @app.delete("/v1/cluster/nodes/{node_id}/drain", tags=["operations"])
    async def undrain_node(node_id: str) -> dict[str, Any]:
        """Lift a drain's cordon: new replicas may be placed on the node again."""
        out: dict[str, Any] = await backend.undrain_node(node_id)
        return out

    # ---- objects ---------------------------------------------------------------------------

    def to_inputs(objects: list[wire.ObjectIn]) -> list[ObjectInput]:
        return [
            ObjectInput(
                o.id,
                o.properties,
                {k: _to_array(v, f"objects[{i}].vectors.{k}") for k, v in o.vectors.items()},
            )
            for i, o in enumerate(objects)
        ]

    @app.post(
        "/v1/collections/{name}/objects",
        tags=["objects"],
        response_model=wire.BatchOut,
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/BatchIn"}},
                    ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}},
                }
            }
        },
    )
    async def insert_objects(name: str, request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "application/json").split(";")[0]
        level = request.query_params.get("consistency_level")  # or the JSON body's field
        if content_type == ARROW_STREAM:
            from gateway.arrow_import import batch_from_arrow

            inputs = batch_from_arrow(await read_body(request, settings.max_body_bytes))
        else:
            raw = await request.body()
            try:
                batch = wire.BatchIn.model_validate_json(raw)
            except ValidationError as exc:
                raise validation_errors_to_colshard(list(exc.errors())) from None
            limits.check_batch_size(len(batch.objects), settings)
            inputs = to_inputs(batch.objects)
            level = batch.consistency_level or level
        limits.check_objects(inputs, settings)
        results = await backend.upsert(
            name, inputs, api_keys_from(request), level, timeout_s=settings.write_timeout_s
        )
        return FastJSONResponse(batch_out(results))

    @app.post(
        "/v1/collections/{name}/objects/delete", tags=["objects"], response_model=wire.DeleteManyOut
    )
    async def delete_many(
        name: str, body: wire.DeleteManyIn, consistency_level: str | None = None
    ) -> dict[str, Any]:
        """Delete by filter (``dry_run`` counts the matches without deleting)."""
        limits.check_filter(body.filters, settings)
        out: dict[str, Any] = await backend.delete_where(
            name,
            body.filters,
            body.dry_run,
            body.consistency_level or consistency_level,
            timeout_s=settings.write_timeout_s,
        )
        return out

    @app.get("/v1/collections/{name}/objects", tags=["objects"], response_model=wire.ObjectPage)
    async def list_objects(
        name: str,
        limit: int = Query(100, ge=1, le=settings.max_limit),
        after: str | None = None,
        include_vector: bool = False,
    ) -> JSONResponse:
        objs: list[StoredObject] = await backend.list_objects(name, after, limit, include_vector)
        next_after = objs[-1].uuid if len(objs) == limit else None
        return FastJSONResponse(
            {"objects": [object_out(name, o) for o in objs], "next_after": next_after}
        )

    @app.get(
        "/v1/collections/{name}/objects/{object_id}",
        tags=["objects"],
        response_model=wire.ObjectOut,
    )
    async def get_object(name: str, object_id: str, include_vector: bool = False) -> JSONResponse:
        obj: StoredObject = await backend.get_object(name, object_id, include_vector)
        return FastJSONResponse(object_out(name, obj))

    @app.put(
        "/v1/collections/{name}/objects/{object_id}",
        tags=["objects"],
        response_model=wire.ObjectResult,
    )
    async def replace_object(
        name: str, object_id: str, body: wire.ObjectIn, request: Request
    ) -> JSONResponse:
        _check_body_id(body, object_id)
        body = body.model_copy(update={"id": object_id})
        inputs = to_inputs([body])
        limits.check_objects(inputs, settings)
        results = await backend.upsert(
            name,
            inputs,
            api_keys_from(request),
            request.query_params.get("consistency_level"),
            timeout_s=settings.write_timeout_s,
        )
        return _single_write(results[0])

    @app.patch(
        "/v1/collections/{name}/objects/{object_id}",
        tags=["objects"],
        response_model=wire.ObjectResult,
    )
    async def patch_object(
        name: str, object_id: str, body: wire.ObjectIn, request: Request
    ) -> JSONResponse:
        _check_body_id(body, object_id)
        current: StoredObject = await backend.get_object(name, object_id, True)
        merged_vectors = {k: v for k, v in (current.vectors or {}).items() if len(v)}
        merged_vectors.update({k: _to_array(v, f"vectors.{k}") for k, v in body.vectors.items()})
        merged = ObjectInput(
            current.uuid, {**current.properties, **body.properties}, merged_vectors
        )
        limits.check_objects([merged], settings)
        results = await backend.upsert(
            name,
            [merged],
            api_keys_from(request),
            request.query_params.get("consistency_level"),
            timeout_s=settings.write_timeout_s,
        )
        return _single_write(results[0])

    @app.delete("/v1/collections/{name}/objects/{object_id}", tags=["objects"])
    async def delete_object(
        name: str, object_id: str, consistency_level: str | None = None
    ) -> dict[str, Any]:
        existed = await backend.delete_object(
            name, object_id, consistency_level, timeout_s=settings.write_timeout_s
        )
        if not existed:
            raise NotFound(
                f"object {object_id} not found in {name!r}", {"collection": name, "id": object_id}
            )
        return {"deleted": object_id}

    # ---- query -----------------------------------------------------------------------------

    @app.post("/v1/collections/{name}/query", tags=["query"], response_model=wire.QueryOut)
    async def query(name: str, body: wire.QueryIn, request: Request) -> JSONResponse:
        limits.check_page(body.limit, body.offset, settings)
        limits.check_filter(body.filters, settings)
        near = (
            _array_or_raw(body.near_vector.vector, "near_vector.vector")
            if body.near_vector
            else None
        )
        hybrid_vector = _array_or_raw(body.hybrid.vector, "hybrid.vector") if body.hybrid else None
        if body.near_vector is not None:
            limits.check_query_vector(near, "near_vector.vector", settings)
        if hybrid_vector is not None:
            limits.check_query_vector(hybrid_vector, "hybrid.vector", settings)
        req = QueryRequest(
            collection=name,
            near_vector=(_to_array(near, "near_vector.vector") if body.near_vector else None),
            near_text=body.near_text.query if body.near_text else None,
            bm25=(
                Bm25Query(
                    body.bm25.query,
                    tuple(body.bm25.properties) if body.bm25.properties is not None else None,
                )
                if body.bm25
                else None
            ),
            hybrid=(
                HybridQuery(
                    body.hybrid.query,
                    body.hybrid.alpha,
                    body.hybrid.fusion,
                    _to_array(hybrid_vector, "hybrid.vector"),
                    tuple(body.hybrid.properties) if body.hybrid.properties is not None else None,
                )
                if body.hybrid
                else None
            ),
            target_vector=body.target_vector,
            filters=body.filters,
            limit=body.limit,
            offset=body.offset,
            return_properties=(
                tuple(body.return_properties) if body.return_properties is not None else None
            ),
            return_metadata=tuple(body.return_metadata),
            include_vector=body.include_vector,
            partial=body.partial or body.allow_partial,
            exact=body.exact,
            timeout_s=body.timeout,
            api_keys=api_keys_from(request),
        )
        req.kind()  # exactly one search kind: fail before any Ray call
        # The gateway waits a little longer than the query's own deadline, so the coordinator's
        # 504 (naming the slow shard) or partial result arrives first.
        result: QueryResult = await backend.query(
            req, timeout_s=(body.timeout or settings.query_timeout_s) + QUERY_ANSWER_MARGIN_S
        )
        return FastJSONResponse(query_out(result))

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # type: ignore[arg-type]
    if keys:  # outermost: a request without a key is turned away before its body is read
        app.add_middleware(
            ApiKeyAuth,
            keys=keys,  # type: ignore[arg-type]
            on_reject=lambda status: auth_rejections.labels(str(status)).inc(),
        )
    _add_schemas(app, {"BatchIn": wire.BatchIn})
    return app


def _add_schemas(app: FastAPI, models: dict[str, type[Any]]) -> None:
    """Put ``models`` (bodies that routes parse themselves, e.g. the insert route that also
    takes Arrow) into the OpenAPI components, so that every ``$ref`` resolves."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in models.items():
                extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for sub, definition in extra.pop("$defs", {}).items():
                    components.setdefault(sub, definition)
                components.setdefault(name, extra)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _check_body_id(body: wire.ObjectIn, object_id: str) -> None:
    if body.id is not None and body.id.lower() != object_id.lower():
        raise InvalidInput(
            "the body's id differs from the path's id", {"id": body.id, "path_id": object_id}
        )


def _single_write(result: WriteResult) -> JSONResponse:
    if not result.ok:
        raise error_from_dict(dict(result.error or {}))
    return JSONResponse({"id": result.uuid, "status": "SUCCESS", "error": None})


def validation_errors_to_colshard(errors: list[Any]) -> ColshardError:
    """pydantic's error list -> BadRequest (not JSON) or InvalidInput naming the first field."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return BadRequest("request body is not valid JSON")
    first = errors[0] if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return InvalidInput(
        f"{loc}: {first.get('msg', 'invalid request')}",
        {
            "errors": [
                {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg"))}
                for e in errors[:20]
            ]
        },
    )
