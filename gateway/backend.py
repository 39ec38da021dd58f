"""How the gateway reaches the coordinator: ``Backend``, typed by ``cluster.api.CoordinatorAPI``.

``Backend`` has one method per coordinator verb, with the verb's parameters and result type
plus a ``timeout_s``; it sends each call over a ``Transport``:

- ``LocalTransport`` calls an in-process object with the verbs (the gateway embedded in the
  coordinator actor, ``gateway.server.EmbeddedGateway``; unit tests);
- ``gateway.ray_backend.RayTransport`` calls the named ``CoordinatorActor`` across Ray (all of
  the gateway's Ray calls live there, so the HTTP app never imports Ray).

Errors come back as colshard errors whatever the transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

from cluster.api import CoordinatorAPI
from cluster.errors import DeadlineExceeded
from cluster.query import QueryRequest, QueryResult
from cluster.spec import CollectionSpec
from cluster.types import StoredObject, WriteResult
from cluster.validation import ColumnarInput, ObjectInput

R = TypeVar("R")


class Transport(Protocol):
    async def call(self, method: str, args: tuple[Any, ...], timeout_s: float | None) -> Any: ...


class LocalTransport:
    """Calls ``target``'s async methods directly. With ``detach`` a call the gateway stops
    waiting for (its timeout, or the request task cancelled) runs on to its end, as a call
    across Ray would: the embedded gateway must not cancel the coordinator's work halfway.

    A ``query`` is never detached: it changes nothing, so one the gateway gives up on is
    cancelled (its shard calls are dropped, freeing the coordinator), and it runs in the
    request's own task, one task switch less per query than a shielded call."""

    READ_ONLY = frozenset({"query"})

    def __init__(self, target: Any, *, detach: bool = False) -> None:
        self._target = target
        self._detach = detach

    async def call(self, method: str, args: tuple[Any, ...], timeout_s: float | None) -> Any:
        work = getattr(self._target, method)(*args)
        try:
            if self._detach and method not in self.READ_ONLY:
                return await asyncio.wait_for(asyncio.shield(work), timeout_s)
            async with asyncio.timeout(timeout_s):
                return await work
        except TimeoutError as exc:
            raise DeadlineExceeded(f"coordinator did not answer {method} in time") from exc


class Backend:
    """The coordinator's verbs (``CoordinatorAPI``), each with a ``timeout_s`` (None: the
    transport's default)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def _call(
        self, verb: Callable[..., Awaitable[R]], args: tuple[Any, ...], timeout_s: float | None
    ) -> R:
        return cast(R, await self._transport.call(verb.__name__, args, timeout_s))

    async def readiness(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._call(CoordinatorAPI.readiness, (), timeout_s)

    async def cluster_info(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._call(CoordinatorAPI.cluster_info, (), timeout_s)

    async def create_collection(
        self, raw: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> CollectionSpec:
        return await self._call(CoordinatorAPI.create_collection, (raw,), timeout_s)

    async def list_collections(self, *, timeout_s: float | None = None) -> list[CollectionSpec]:
        return await self._call(CoordinatorAPI.list_collections, (), timeout_s)

    async def describe_collection(
        self, name: str, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        return await self._call(CoordinatorAPI.describe_collection, (name,), timeout_s)

    async def quality(
        self,
        name: str,
        vector: str | None,
        k: int | None,
        queries: int,
        seed: int | None,
        detail: bool = False,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return await self._call(
            CoordinatorAPI.quality, (name, vector, k, queries, seed, detail), timeout_s
        )

    async def delete_collection(self, name: str, *, timeout_s: float | None = None) -> None:
        await self._call(CoordinatorAPI.delete_collection, (name,), timeout_s)

    async def upsert(
        self,
        collection: str,
        objects: Sequence[ObjectInput] | ColumnarInput,
        api_keys: Mapping[str, str] | None = None,
        consistency_level: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> list[WriteResult]:
        return await self._call(
            CoordinatorAPI.upsert, (collection, objects, api_keys, consistency_level), timeout_s
        )

    async def delete_where(
        self,
        collection: str,
        raw_filter: Mapping[str, Any],
        dry_run: bool,
        consistency_level: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return await self._call(
            CoordinatorAPI.delete_where,
            (collection, raw_filter, dry_run, consistency_level),
            timeout_s,
        )

    async def list_objects(
        self,
        collection: str,
        after: str | None,
        limit: int,
        include_vector: bool,
        *,
        timeout_s: float | None = None,
    ) -> list[StoredObject]:
        return await self._call(
            CoordinatorAPI.list_objects, (collection, after, limit, include_vector), timeout_s
        )

    async def get_object(
        self, collection: str, uuid: str, include_vector: bool, *, timeout_s: float | None = None
    ) -> StoredObject:
        return await self._call(
            CoordinatorAPI.get_object, (collection, uuid, include_vector), timeout_s
        )

    async def delete_object(
        self,
        collection: str,
        uuid: str,
        consistency_level: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> bool:
        return await self._call(
            CoordinatorAPI.delete_object, (collection, uuid, consistency_level), timeout_s
        )

    async def query(self, req: QueryRequest, *, timeout_s: float | None = None) -> QueryResult:
        return await self._call(CoordinatorAPI.query, (req,), timeout_s)

    async def backup(
        self,
        backup_id: str,
        collections: Sequence[str] | None = None,
        wait: bool = True,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return await self._call(CoordinatorAPI.backup, (backup_id, collections, wait), timeout_s)

    async def list_backups(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return await self._call(CoordinatorAPI.list_backups, (), timeout_s)

    async def get_backup(self, backup_id: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._call(CoordinatorAPI.get_backup, (backup_id,), timeout_s)

    async def delete_backup(self, backup_id: str, *, timeout_s: float | None = None) -> None:
        await self._call(CoordinatorAPI.delete_backup, (backup_id,), timeout_s)

    async def restore(
        self,
        backup_id: str,
        collection: str,
        new_name: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return await self._call(
            CoordinatorAPI.restore, (backup_id, collection, new_name), timeout_s
        )

    async def move_replica(
        self,
        name: str,
        shard: int,
        replica: int,
        to_node: str,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return await self._call(
            CoordinatorAPI.move_replica, (name, shard, replica, to_node), timeout_s
        )

    async def drain_node(self, node_id: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._call(CoordinatorAPI.drain_node, (node_id,), timeout_s)

    async def undrain_node(self, node_id: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._call(CoordinatorAPI.undrain_node, (node_id,), timeout_s)
