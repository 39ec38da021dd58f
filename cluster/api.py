"""The coordinator's API as the gateway calls it: one typed Protocol.

``coordinator.actor.CoordinatorActor`` implements it (mypy checks that, in actor.py); the
gateway reaches it only through ``gateway.backend.Backend``, whose methods are these verbs with a
per-call timeout and whose result types are taken from here, so a renamed verb or a changed
result type fails mypy on both sides instead of at run time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from cluster.query import QueryRequest, QueryResult
from cluster.spec import CollectionSpec
from cluster.types import StoredObject, WriteResult
from cluster.validation import ColumnarInput, ObjectInput


class CoordinatorAPI(Protocol):
    async def readiness(self) -> dict[str, Any]: ...

    async def cluster_info(self) -> dict[str, Any]: ...

    async def create_collection(self, raw: Mapping[str, Any]) -> CollectionSpec: ...

    async def list_collections(self) -> list[CollectionSpec]: ...

    async def describe_collection(self, name: str) -> dict[str, Any]: ...

    async def quality(
        self,
        name: str,
        vector: str | None,
        k: int | None,
        queries: int,
        seed: int | None,
        detail: bool = False,
    ) -> dict[str, Any]: ...

    async def delete_collection(self, name: str) -> None: ...

    async def upsert(
        self,
        collection: str,
        objects: Sequence[ObjectInput] | ColumnarInput,
        api_keys: Mapping[str, str] | None = None,
        consistency_level: str | None = None,
    ) -> list[WriteResult]: ...

    async def delete_where(
        self,
        collection: str,
        raw_filter: Mapping[str, Any],
        dry_run: bool,
        consistency_level: str | None = None,
    ) -> dict[str, Any]: ...

    async def list_objects(
        self, collection: str, after: str | None, limit: int, include_vector: bool
    ) -> list[StoredObject]: ...

    async def get_object(
        self, collection: str, uuid: str, include_vector: bool
    ) -> StoredObject: ...

    async def delete_object(
        self, collection: str, uuid: str, consistency_level: str | None = None
    ) -> bool: ...

    async def query(self, req: QueryRequest) -> QueryResult: ...

    async def backup(
        self, backup_id: str, collections: Sequence[str] | None = None, wait: bool = True
    ) -> dict[str, Any]: ...

    async def list_backups(self) -> list[dict[str, Any]]: ...

    async def get_backup(self, backup_id: str) -> dict[str, Any]: ...

    async def delete_backup(self, backup_id: str) -> None: ...

    async def restore(
        self, backup_id: str, collection: str, new_name: str | None = None
    ) -> dict[str, Any]: ...

    async def move_replica(
        self, name: str, shard: int, replica: int, to_node: str
    ) -> dict[str, Any]: ...

    async def drain_node(self, node_id: str) -> dict[str, Any]: ...

    async def undrain_node(self, node_id: str) -> dict[str, Any]: ...


VERBS: tuple[str, ...] = tuple(name for name in vars(CoordinatorAPI) if not name.startswith("_"))
