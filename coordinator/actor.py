"""``CoordinatorActor``: the async Ray actor shell that wires ``Coordinator`` to etcd and Ray.

One coordinator per colshard cluster, named ``colshard:coordinator`` in the cluster's Ray
namespace, detached, so every gateway (``colshard serve`` or ``colshard gateway``) finds it by
name. Its methods are the coordinator's verbs; errors cross back to gateways as colshard errors.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.etcd_store import EtcdStore
from cluster.query import QueryRequest, QueryResult
from cluster.settings import Settings
from cluster.spec import CollectionSpec
from cluster.types import StoredObject, WriteResult
from cluster.validation import ObjectInput
from coordinator.placement import RayPlacement
from coordinator.service import Coordinator

MEMBER_TTL_S = 10


def ray_namespace(cluster_name: str) -> str:
    return f"colshard-{cluster_name}"


class CoordinatorActor:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._coordinator: Coordinator | None = None
        self._store: EtcdStore | None = None
        self._member: Any = None
        self._start_lock = asyncio.Lock()

    async def _core(self) -> Coordinator:
        if self._coordinator is not None:
            return self._coordinator
        async with self._start_lock:
            if self._coordinator is not None:
                return self._coordinator
            store = await EtcdStore.connect(self._settings.etcd_endpoints,
                                            self._settings.cluster_name,
                                            self._settings.etcd_timeout_s)
            placement = RayPlacement(ray_namespace(self._settings.cluster_name),
                                     self._settings.data_dir, self._settings.shard)
            coordinator = Coordinator(store, placement, self._settings)
            await coordinator.start()
            # This node's membership, bound to a lease: it disappears when the node dies.
            self._member = await store.register_member(*self._member_info(), ttl_s=MEMBER_TTL_S)
            self._store, self._coordinator = store, coordinator
            return coordinator

    @staticmethod
    def _member_info() -> tuple[str, dict[str, Any]]:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        return node_id, {"host": socket.gethostname(), "pid": os.getpid(),
                         "roles": ["coordinator"], "started": time.time()}

    async def start(self) -> bool:
        await self._core()
        return True

    async def create_collection(self, raw: Mapping[str, Any]) -> CollectionSpec:
        return await (await self._core()).create_collection(raw)

    async def get_collection(self, name: str) -> CollectionSpec:
        return (await self._core()).spec(name)

    async def describe_collection(self, name: str) -> dict[str, Any]:
        return await (await self._core()).describe_collection(name)

    async def list_collections(self) -> list[CollectionSpec]:
        return await (await self._core()).list_collections()

    async def delete_collection(self, name: str) -> None:
        await (await self._core()).delete_collection(name)

    async def upsert(self, collection: str, objects: Sequence[ObjectInput],
                     api_keys: Mapping[str, str] | None = None) -> list[WriteResult]:
        return await (await self._core()).upsert(collection, objects, api_keys)

    async def delete_where(self, collection: str, raw_filter: Mapping[str, Any],
                           dry_run: bool) -> dict[str, Any]:
        return await (await self._core()).delete_where(collection, raw_filter, dry_run)

    async def get_object(self, collection: str, uuid: str, include_vector: bool
                         ) -> StoredObject:
        return await (await self._core()).get_object(collection, uuid, include_vector)

    async def delete_object(self, collection: str, uuid: str) -> bool:
        return await (await self._core()).delete_object(collection, uuid)

    async def list_objects(self, collection: str, after: str | None, limit: int,
                           include_vector: bool) -> list[StoredObject]:
        return await (await self._core()).list_objects(collection, after, limit, include_vector)

    async def query(self, req: QueryRequest) -> QueryResult:
        return await (await self._core()).query(req)

    async def cluster_info(self) -> dict[str, Any]:
        return await (await self._core()).cluster_info()

    async def readiness(self) -> dict[str, Any]:
        return await (await self._core()).readiness()
