"""colshard's Python SDK (httpx; imports neither FastAPI nor Ray). It reads like the multi-vector
tutorial users know::

    from gateway.client import Client, Property, NamedVector

    with Client("http://127.0.0.1:8080") as client:
        col = client.collections.create(
            "DemoCollection",
            properties=[Property("text", "text")],
            vectors=[NamedVector("multi_vector", dim=128, kind="multi")])
        col.data.insert_many([{"properties": {"text": "A very nice cat"},
                               "vectors": {"multi_vector": matrix}}])
        obj = col.query.fetch_object_by_id(uuid, include_vector=True)
        res = col.query.near_vector(near_vector=query_matrix, target_vector="multi_vector",
                                    limit=3, return_metadata=["score"])

HTTP errors come back as the same typed exceptions the server raises (``cluster.errors``):
the SDK inverts the gateway's error table (401 -> ``Unauthorized``, 403 -> ``Forbidden``, 413 ->
``PayloadTooLarge``, ...). ``Client(url, api_key=KEY)`` sends ``Authorization: Bearer KEY``
(default: ``$COLSHARD_API_KEY``).
"""

from __future__ import annotations

import io
import os
import ssl
import uuid as uuid_mod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from cluster import vector_wire
from cluster.errors import (
    ColshardError,
    Forbidden,
    InternalError,
    PayloadTooLarge,
    Unauthorized,
    error_from_dict,
)

__all__ = [
    "BatchResult",
    "Client",
    "Collection",
    "ColshardError",
    "Forbidden",
    "NamedVector",
    "Object",
    "PayloadTooLarge",
    "Property",
    "QueryReturn",
    "Unauthorized",
    "connect_to_local",
]

ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Property:
    name: str
    data_type: str
    searchable: bool | None = None
    filterable: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "data_type": self.data_type}
        if self.searchable is not None:
            out["searchable"] = self.searchable
        if self.filterable is not None:
            out["filterable"] = self.filterable
        return out


@dataclass(frozen=True)
class NamedVector:
    name: str
    dim: int | None = None
    kind: str = "multi"
    metric: str = "cosine"
    vectorizer: Mapping[str, Any] | None = None
    index: Mapping[str, Any] | None = None
    dtype: str | None = None  # the server's default: float32, or float16 for that codec
    # "float32" | "float16" | "int8" | "residual" or {"kind", "bits", "originals"}
    codec: str | Mapping[str, Any] | None = None
    pooling: Mapping[str, Any] | None = None  # {"factor": 2, "min_tokens": 0}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "metric": self.metric}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.codec is not None:
            out["codec"] = self.codec if isinstance(self.codec, str) else dict(self.codec)
        if self.pooling is not None:
            out["pooling"] = dict(self.pooling)
        if self.dim is not None:
            out["dim"] = self.dim
        if self.vectorizer is not None:
            out["vectorizer"] = dict(self.vectorizer)
        if self.index is not None:
            out["index"] = dict(self.index)
        return out

    @classmethod
    def text2colbert_local(
        cls, name: str, source_properties: Sequence[str], **options: Any
    ) -> NamedVector:
        return cls(
            name,
            None,
            "multi",
            "cosine",
            {
                "kind": "text2colbert-local",
                "source_properties": list(source_properties),
                "options": options,
            },
        )

    @classmethod
    def text2colbert_jinaai(
        cls, name: str, source_properties: Sequence[str], **options: Any
    ) -> NamedVector:
        return cls(
            name,
            options.get("dimensions"),
            "multi",
            "cosine",
            {
                "kind": "text2colbert-jinaai",
                "source_properties": list(source_properties),
                "options": options,
            },
        )


@dataclass(frozen=True)
class Object:
    uuid: str
    properties: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: dict[str, Any] = field(default_factory=dict)  # name -> list / list of lists


@dataclass(frozen=True)
class QueryReturn:
    objects: list[Object]
    missing_shards: list[int]
    took_ms: float
    # True when shards did not answer in time and the query allowed partial results.
    partial: bool = False


@dataclass(frozen=True)
class BatchResult:
    n_ok: int
    n_failed: int
    results: list[dict[str, Any]]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] != "SUCCESS"]


def _tolist(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _wire_vector(value: Any) -> Any:
    """A vector as the SDK sends it: in binary form (``cluster.vector_wire``: half the bytes
    of decimal text, parsed faster) when it is a 1-D or 2-D array of numbers; anything else
    as given, for the server to name what is wrong with it."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return _tolist(value)
    if array.dtype.kind not in "iuf" or array.ndim not in (1, 2):
        return _tolist(value)
    with np.errstate(over="ignore"):  # beyond float32: inf, rejected by the server as such
        return vector_wire.encode(array)


def _with_ids(table: Any) -> Any:
    """``table`` with an id on every row: fresh uuid4s where the ``id`` column is missing or
    null, fixed client-side so that a retried batch overwrites instead of duplicating."""
    import pyarrow as pa

    if "id" in table.column_names:
        ids = table.column("id").to_pylist()
        if all(v is not None for v in ids):
            return table
        filled = [str(v) if v is not None else str(uuid_mod.uuid4()) for v in ids]
        return table.set_column(table.column_names.index("id"), "id", pa.array(filled))
    return table.append_column(
        "id", pa.array([str(uuid_mod.uuid4()) for _ in range(table.num_rows)])
    )


def _distinct_ids(table: Any) -> bool:
    """No uuid twice in the table's ``id`` column (rows without an id get fresh ones)."""
    if "id" not in table.column_names:
        return True
    seen: set[int] = set()
    for value in table.column("id").to_pylist():
        if value is None:
            continue
        try:
            key = uuid_mod.UUID(str(value)).int
        except ValueError:
            return False  # the server rejects it; keep the one-at-a-time behaviour
        if key in seen:
            return False
        seen.add(key)
    return True


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        payload = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        raise InternalError(f"HTTP {response.status_code}: {response.text[:200]}") from None
    raise error_from_dict(payload)


# Request bodies larger than this are handed to httpx in slices of this size (with their
# Content-Length, so they still go out as one plain body): httpcore sends a bytes body with
# ``buffer = buffer[sent:]`` after every partial socket send, copying what is left of a 32 MB
# Arrow batch again after each of its many sends. Slices bound each copy to one slice.
SEND_SLICE_BYTES = 1 << 20


def sliced_body(content: bytes) -> tuple[Any, dict[str, str]]:
    """``content`` as httpx ``content`` plus the headers it needs: large bodies as a list of
    memoryview slices (re-iterable, so a retried request can send it again)."""
    if len(content) <= SEND_SLICE_BYTES:
        return content, {}
    view = memoryview(content)
    return (
        [view[i : i + SEND_SLICE_BYTES] for i in range(0, len(view), SEND_SLICE_BYTES)],
        {"content-length": str(len(view))},
    )


class _Http:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        content = kwargs.get("content")
        if isinstance(content, bytes) and len(content) > SEND_SLICE_BYTES:
            kwargs["content"], extra = sliced_body(content)
            kwargs["headers"] = {**(kwargs.get("headers") or {}), **extra}
        response = self.http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()


class _Data:
    def __init__(self, http: _Http, name: str, consistency_level: str | None = None) -> None:
        self._http = http
        self._name = name
        # Sent as ?consistency_level= on every write (one / quorum / all; server default quorum).
        self._params = {"consistency_level": consistency_level} if consistency_level else {}

    def insert(
        self,
        properties: Mapping[str, Any] | None = None,
        vector: Mapping[str, Any] | None = None,
        uuid: str | None = None,
    ) -> str:
        result = self.insert_many(
            [{"id": uuid, "properties": properties or {}, "vectors": vector or {}}]
        )
        if result.n_failed:
            raise error_from_dict(result.errors[0].get("error") or {})
        return str(result.results[0]["id"])

    def insert_many(
        self, objects: Iterable[Mapping[str, Any]], *, batch_size: int = 100, progress: bool = False
    ) -> BatchResult:
        """Objects are dicts with optional ``id``/``uuid``, ``properties`` and ``vectors``
        (numpy arrays or nested lists)."""
        items = [self._wire(o) for o in objects]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), unit="obj", desc=f"import {self._name}")
        results: list[dict[str, Any]] = []
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                out = self._http.request(
                    "POST",
                    f"/v1/collections/{self._name}/objects",
                    json={"objects": chunk},
                    params=self._params,
                )
                results.extend(out["results"])
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        n_ok = sum(1 for r in results if r["status"] == "SUCCESS")
        return BatchResult(n_ok, len(results) - n_ok, results)

    @staticmethod
    def _wire(obj: Mapping[str, Any]) -> dict[str, Any]:
        oid = obj.get("id", obj.get("uuid"))
        out: dict[str, Any] = {
            "properties": dict(obj.get("properties") or {}),
            "vectors": {
                k: _wire_vector(v)
                for k, v in (obj.get("vectors") or obj.get("vector") or {}).items()
            },
        }
        # The id is fixed here, not by the server: a batch retried after a timeout or a lost
        # answer overwrites the objects it wrote the first time instead of duplicating them.
        out["id"] = str(oid) if oid is not None else str(uuid_mod.uuid4())
        return out

    def insert_arrow(
        self, table: Any, *, batch_rows: int = 2000, progress: bool = False, concurrency: int = 2
    ) -> BatchResult:
        """Import a ``pyarrow.Table`` (columns ``id``, properties, and one list<list<float>>
        column per named vector) as Arrow IPC streams of ``batch_rows`` objects.

        ``concurrency`` batches are in flight at once (the next one is encoded and sent while
        the server writes the previous one); results come back in table order. Only when the
        table's ids are all distinct (or absent): otherwise two batches holding the same id
        could land in either order, so they are sent one at a time. If a batch fails, the
        error is raised once the batches already in flight have finished (those may have
        been applied)."""
        table = _with_ids(table)
        if concurrency > 1 and not _distinct_ids(table):
            concurrency = 1
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=table.num_rows, unit="obj", desc=f"import {self._name}")
        results: list[dict[str, Any]] = []
        try:
            if concurrency <= 1:
                for batch in table.to_batches(max_chunksize=batch_rows):
                    results.extend(self._post_arrow(batch))
                    if bar is not None:
                        bar.update(batch.num_rows)
            else:
                self._insert_arrow_pipelined(table, batch_rows, concurrency, results, bar)
        finally:
            if bar is not None:
                bar.close()
        n_ok = sum(1 for r in results if r["status"] == "SUCCESS")
        return BatchResult(n_ok, len(results) - n_ok, results)

    def _insert_arrow_pipelined(
        self, table: Any, batch_rows: int, concurrency: int, results: list[dict[str, Any]], bar: Any
    ) -> None:
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor, wait

        in_flight: deque[tuple[Future[list[dict[str, Any]]], int]] = deque()
        with ThreadPoolExecutor(concurrency, thread_name_prefix="colshard-import") as pool:
            try:
                for batch in table.to_batches(max_chunksize=batch_rows):
                    if len(in_flight) >= concurrency:
                        self._collect(in_flight.popleft(), results, bar)
                    in_flight.append((pool.submit(self._post_arrow, batch), batch.num_rows))
                while in_flight:
                    self._collect(in_flight.popleft(), results, bar)
            except BaseException:
                wait([f for f, _ in in_flight])  # nothing left running behind the caller
                raise

    @staticmethod
    def _collect(item: tuple[Any, int], results: list[dict[str, Any]], bar: Any) -> None:
        future, n_rows = item
        results.extend(future.result())
        if bar is not None:
            bar.update(n_rows)

    def _post_arrow(self, batch: Any) -> list[dict[str, Any]]:
        import pyarrow as pa

        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        out = self._http.request(
            "POST",
            f"/v1/collections/{self._name}/objects",
            content=sink.getvalue(),
            headers={"content-type": ARROW_STREAM},
            params=self._params,
        )
        rows: list[dict[str, Any]] = out["results"]
        return rows

    def import_parquet(
        self, path: str, *, batch_rows: int = 2000, progress: bool = True, concurrency: int = 2
    ) -> BatchResult:
        import pyarrow.parquet as pq

        return self.insert_arrow(
            pq.read_table(path), batch_rows=batch_rows, progress=progress, concurrency=concurrency
        )

    def delete_many(self, where: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = self._http.request(
            "POST",
            f"/v1/collections/{self._name}/objects/delete",
            json={"filters": dict(where), "dry_run": dry_run},
            params=self._params,
        )
        return out

    def delete_by_id(self, uuid: str) -> None:
        self._http.request(
            "DELETE", f"/v1/collections/{self._name}/objects/{uuid}", params=self._params
        )

    def replace(
        self, uuid: str, properties: Mapping[str, Any], vector: Mapping[str, Any] | None = None
    ) -> None:
        self._http.request(
            "PUT",
            f"/v1/collections/{self._name}/objects/{uuid}",
            json={
                "properties": dict(properties),
                "vectors": {k: _wire_vector(v) for k, v in (vector or {}).items()},
            },
            params=self._params,
        )

    def update(
        self,
        uuid: str,
        properties: Mapping[str, Any] | None = None,
        vector: Mapping[str, Any] | None = None,
    ) -> None:
        self._http.request(
            "PATCH",
            f"/v1/collections/{self._name}/objects/{uuid}",
            json={
                "properties": dict(properties or {}),
                "vectors": {k: _wire_vector(v) for k, v in (vector or {}).items()},
            },
            params=self._params,
        )


class _Query:
    def __init__(self, http: _Http, name: str, options: Mapping[str, Any] | None = None) -> None:
        self._http = http
        self._name = name
        self._options = dict(options or {})  # timeout / allow_partial, added to every query

    def fetch_object_by_id(self, uuid: str, include_vector: bool = False) -> Object:
        out = self._http.request(
            "GET",
            f"/v1/collections/{self._name}/objects/{uuid}",
            params={"include_vector": str(include_vector).lower()},
        )
        return Object(out["id"], out["properties"], {}, out.get("vectors") or {})

    def fetch_objects(
        self, limit: int = 100, after: str | None = None, include_vector: bool = False
    ) -> list[Object]:
        params: dict[str, Any] = {"limit": limit, "include_vector": str(include_vector).lower()}
        if after:
            params["after"] = after
        out = self._http.request("GET", f"/v1/collections/{self._name}/objects", params=params)
        return [
            Object(o["id"], o["properties"], {}, o.get("vectors") or {}) for o in out["objects"]
        ]

    def _run(
        self,
        body: dict[str, Any],
        *,
        limit: int,
        offset: int,
        target_vector: str | None,
        filters: Mapping[str, Any] | None,
        return_metadata: Sequence[str] | None,
        return_properties: Sequence[str] | None,
        include_vector: bool,
    ) -> QueryReturn:
        body.update(
            {
                "limit": limit,
                "offset": offset,
                "include_vector": include_vector,
                "return_metadata": list(return_metadata or []),
                **self._options,
            }
        )
        if target_vector is not None:
            body["target_vector"] = target_vector
        if filters is not None:
            body["filters"] = dict(filters)
        if return_properties is not None:
            body["return_properties"] = list(return_properties)
        out = self._http.request("POST", f"/v1/collections/{self._name}/query", json=body)
        return QueryReturn(
            [
                Object(o["id"], o["properties"], o.get("metadata") or {}, o.get("vectors") or {})
                for o in out["objects"]
            ],
            out.get("missing_shards", []),
            out.get("took_ms", 0.0),
            bool(out.get("partial", False)),
        )

    def near_vector(
        self,
        near_vector: Any,
        *,
        target_vector: str | None = None,
        limit: int = 10,
        offset: int = 0,
        filters: Mapping[str, Any] | None = None,
        return_metadata: Sequence[str] | None = None,
        return_properties: Sequence[str] | None = None,
        include_vector: bool = False,
    ) -> QueryReturn:
        return self._run(
            {"near_vector": {"vector": _wire_vector(near_vector)}},
            limit=limit,
            offset=offset,
            target_vector=target_vector,
            filters=filters,
            return_metadata=return_metadata,
            return_properties=return_properties,
            include_vector=include_vector,
        )

    def near_text(
        self,
        query: str,
        *,
        target_vector: str | None = None,
        limit: int = 10,
        offset: int = 0,
        filters: Mapping[str, Any] | None = None,
        return_metadata: Sequence[str] | None = None,
        return_properties: Sequence[str] | None = None,
        include_vector: bool = False,
    ) -> QueryReturn:
        return self._run(
            {"near_text": {"query": query}},
            limit=limit,
            offset=offset,
            target_vector=target_vector,
            filters=filters,
            return_metadata=return_metadata,
            return_properties=return_properties,
            include_vector=include_vector,
        )

    def bm25(
        self,
        query: str,
        *,
        query_properties: Sequence[str] | None = None,
        limit: int = 10,
        offset: int = 0,
        filters: Mapping[str, Any] | None = None,
        return_metadata: Sequence[str] | None = None,
        return_properties: Sequence[str] | None = None,
    ) -> QueryReturn:
        bm25: dict[str, Any] = {"query": query}
        if query_properties is not None:
            bm25["properties"] = list(query_properties)
        return self._run(
            {"bm25": bm25},
            limit=limit,
            offset=offset,
            target_vector=None,
            filters=filters,
            return_metadata=return_metadata,
            return_properties=return_properties,
            include_vector=False,
        )

    def hybrid(
        self,
        query: str,
        *,
        alpha: float = 0.75,
        vector: Any = None,
        fusion_type: str = "relative_score",
        target_vector: str | None = None,
        query_properties: Sequence[str] | None = None,
        limit: int = 10,
        offset: int = 0,
        filters: Mapping[str, Any] | None = None,
        return_metadata: Sequence[str] | None = None,
        return_properties: Sequence[str] | None = None,
        include_vector: bool = False,
    ) -> QueryReturn:
        hybrid: dict[str, Any] = {"query": query, "alpha": alpha, "fusion": fusion_type}
        if vector is not None:
            hybrid["vector"] = _wire_vector(vector)
        if query_properties is not None:
            hybrid["properties"] = list(query_properties)
        return self._run(
            {"hybrid": hybrid},
            limit=limit,
            offset=offset,
            target_vector=target_vector,
            filters=filters,
            return_metadata=return_metadata,
            return_properties=return_properties,
            include_vector=include_vector,
        )


class Collection:
    def __init__(
        self,
        http: _Http,
        name: str,
        *,
        consistency_level: str | None = None,
        query_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self._http = http
        self._consistency_level = consistency_level
        self._query_options = dict(query_options or {})
        self.data = _Data(http, name, consistency_level)
        self.query = _Query(http, name, self._query_options)

    def with_consistency_level(self, level: str) -> Collection:
        """This collection with writes acknowledged by ``one``, ``quorum`` (the server's
        default) or ``all`` replicas, as in Weaviate's ``with_consistency_level``."""
        if level not in ("one", "quorum", "all"):
            raise ValueError("consistency level must be 'one', 'quorum' or 'all'")
        return Collection(
            self._http, self.name, consistency_level=level, query_options=self._query_options
        )

    def with_query_options(
        self,
        *,
        timeout: float | None = None,
        allow_partial: bool | None = None,
        exact: bool | None = None,
    ) -> Collection:
        """This collection with a query deadline in seconds (504 naming the slow shard when it
        passes) and, with ``allow_partial``, results from the shards that answered in time
        (``QueryReturn.partial`` and ``missing_shards`` then say what is missing). ``exact``:
        vector searches by exact MaxSim over every object, not the index (spot checks)."""
        options = dict(self._query_options)
        if timeout is not None:
            options["timeout"] = timeout
        if allow_partial is not None:
            options["allow_partial"] = allow_partial
        if exact is not None:
            options["exact"] = exact
        return Collection(
            self._http, self.name, consistency_level=self._consistency_level, query_options=options
        )

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = self._http.request("GET", f"/v1/collections/{self.name}")
        return out

    def quality(
        self,
        *,
        vector: str | None = None,
        k: int | None = None,
        queries: int = 50,
        seed: int | None = None,
        detail: bool = False,
    ) -> dict[str, Any]:
        """The recall report: recall@k of the search as served, per shard and collection-wide,
        measured now against exact MaxSim (``GET /v1/collections/{name}/quality``)."""
        params: dict[str, Any] = {"queries": queries}
        if detail:
            params["detail"] = "true"
        for key, value in (("vector", vector), ("k", k), ("seed", seed)):
            if value is not None:
                params[key] = value
        out: dict[str, Any] = self._http.request(
            "GET", f"/v1/collections/{self.name}/quality", params=params
        )
        return out


class _Collections:
    def __init__(self, http: _Http) -> None:
        self._http = http

    def create(
        self,
        name: str,
        *,
        properties: Sequence[Property | Mapping[str, Any]] = (),
        vectors: Sequence[NamedVector | Mapping[str, Any]] = (),
        shard_count: int = 2,
        replication_factor: int = 1,
    ) -> Collection:
        body = {
            "name": name,
            "properties": [p.to_dict() if isinstance(p, Property) else dict(p) for p in properties],
            "vectors": [v.to_dict() if isinstance(v, NamedVector) else dict(v) for v in vectors],
            "shard_count": shard_count,
            "replication_factor": replication_factor,
        }
        self._http.request("POST", "/v1/collections", json=body)
        return Collection(self._http, name)

    def get(self, name: str) -> Collection:
        return Collection(self._http, name)

    def exists(self, name: str) -> bool:
        try:
            self._http.request("GET", f"/v1/collections/{name}")
        except ColshardError as exc:
            if exc.code == "not_found":
                return False
            raise
        return True

    def list_all(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._http.request("GET", "/v1/collections")["collections"]
        return out

    def delete(self, name: str) -> None:
        self._http.request("DELETE", f"/v1/collections/{name}")


class Client:
    """``Client(url, api_key=...)``; ``api_key`` defaults to ``$COLSHARD_API_KEY`` (none: no
    Authorization header). ``verify`` is httpx's TLS verification (``True``, ``False`` or a CA
    bundle path) for ``https://`` gateways; ``transport`` lets tests run over ASGI."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        headers: Mapping[str, str] | None = None,
        verify: bool | str | ssl.SSLContext = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if isinstance(verify, str):  # a CA bundle, e.g. a self-signed gateway certificate
            verify = ssl.create_default_context(cafile=verify)
        all_headers = dict(headers or {})
        key = api_key if api_key is not None else os.environ.get("COLSHARD_API_KEY")
        if key:
            all_headers["Authorization"] = f"Bearer {key}"
        self._http_client = httpx.Client(
            base_url=url, timeout=timeout_s, headers=all_headers, verify=verify, transport=transport
        )
        http = _Http(self._http_client)
        self.collections = _Collections(http)
        self._http = http

    def is_ready(self) -> bool:
        return bool(self._http_client.get("/readyz").status_code == 200)

    def cluster(self) -> dict[str, Any]:
        out: dict[str, Any] = self._http.request("GET", "/v1/cluster")
        return out

    # ---- backups (admin key; docs/deploy.md "Backup and restore") ----------------------------

    def backup(
        self, backup_id: str, collections: Sequence[str] | None = None, wait: bool = True
    ) -> dict[str, Any]:
        """Back up ``collections`` (None: all) as ``backup_id``; returns the backup's info
        when it is written, or with ``wait=False`` as soon as it has started (state running:
        ``get_backup`` shows its progress)."""
        body = {
            "id": backup_id,
            "collections": list(collections) if collections else None,
            "wait": wait,
        }
        out: dict[str, Any] = self._http.request("POST", "/v1/backups", json=body)
        return out

    def backups(self) -> list[dict[str, Any]]:
        out: dict[str, Any] = self._http.request("GET", "/v1/backups")
        return list(out["backups"])

    def get_backup(self, backup_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._http.request("GET", f"/v1/backups/{backup_id}")
        return out

    def delete_backup(self, backup_id: str) -> None:
        self._http.request("DELETE", f"/v1/backups/{backup_id}")

    def restore(self, backup_id: str, collection: str, name: str | None = None) -> dict[str, Any]:
        """Restore ``collection`` of backup ``backup_id``, as ``name`` (default: its own)."""
        body = {"collection": collection, "name": name}
        out: dict[str, Any] = self._http.request(
            "POST", f"/v1/backups/{backup_id}/restore", json=body
        )
        return out

    # ---- operations (admin key; docs/deploy.md "Moving replicas and draining nodes") ------

    def move_replica(
        self, collection: str, shard: int, to_node: str, replica: int = 0
    ) -> dict[str, Any]:
        """Move ``replica`` of ``collection``'s shard ``shard`` to node ``to_node``, online."""
        out: dict[str, Any] = self._http.request(
            "POST",
            f"/v1/collections/{collection}/shards/{shard}/move",
            json={"to_node": to_node, "replica": replica},
        )
        return out

    def drain(self, node_id: str) -> dict[str, Any]:
        """Move every replica off ``node_id`` (and place no new one there)."""
        out: dict[str, Any] = self._http.request("POST", f"/v1/cluster/nodes/{node_id}/drain")
        return out

    def undrain(self, node_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._http.request("DELETE", f"/v1/cluster/nodes/{node_id}/drain")
        return out

    def close(self) -> None:
        self._http_client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_to_local(port: int = 8080, **kwargs: Any) -> Client:
    return Client(f"http://127.0.0.1:{port}", **kwargs)
