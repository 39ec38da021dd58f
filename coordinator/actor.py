"""``CoordinatorActor``: the async Ray actor shell that wires ``Coordinator`` to etcd and Ray.

One coordinator per colshard cluster, named ``colshard:coordinator`` in the cluster's Ray
namespace, detached, so every gateway (``colshard serve`` or ``colshard gateway``) finds it by
name. Its methods are the coordinator's verbs; errors cross back to gateways as colshard errors.

It can also host a server in its own event loop (``host``): ``colshard serve`` runs the HTTP
gateway this way, so a request costs no Ray call between gateway and coordinator. The server
object comes from the composition root (``gateway.server.EmbeddedGateway``); this module only
knows the ``HostedServer`` protocol.

It also runs the membership monitor (``coordinator.membership``): a node agent on every Ray
node holds the node's ``members/<node_id>`` lease in etcd, and shards whose node left are shown
``unavailable`` in ``cluster_info`` and make ``readiness`` report not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cluster.api import CoordinatorAPI
from cluster.errors import DeadlineExceeded, InternalError
from cluster.etcd_store import EtcdStore
from cluster.query import QueryRequest, QueryResult
from cluster.raynode import ray_node_id
from cluster.settings import Settings
from cluster.spec import CollectionSpec
from cluster.types import StoredObject, WriteResult
from cluster.validation import ColumnarInput, ObjectInput
from coordinator.membership import MembershipMonitor
from coordinator.metrics import CoordinatorMetrics
from coordinator.node_agent import RayNodeAgents
from coordinator.placement import RayPlacement
from coordinator.service import Coordinator


def ray_namespace(cluster_name: str) -> str:
    return f"colshard-{cluster_name}"


class HostedServer(Protocol):
    """A server the coordinator runs in its event loop. ``run(target, started)`` serves
    ``target`` (the actor itself) until ``stop()``, and sets ``started`` once it accepts
    connections; an error before that (e.g. its port is taken) is raised by ``run``."""

    async def run(self, target: CoordinatorAPI, started: asyncio.Event) -> None: ...

    def stop(self) -> None: ...


HOST_START_TIMEOUT_S = 60.0


class CoordinatorActor:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._coordinator: Coordinator | None = None
        self._store: EtcdStore | None = None
        self._membership: MembershipMonitor | None = None
        self._start_lock = asyncio.Lock()
        self._metrics = CoordinatorMetrics()
        self._hosted: tuple[str, HostedServer, asyncio.Task[None]] | None = None
        self._host_lock = asyncio.Lock()  # one host/unhost at a time: one server, one port

    async def _core(self) -> Coordinator:
        if self._coordinator is not None:
            return self._coordinator
        async with self._start_lock:
            if self._coordinator is not None:
                return self._coordinator
            store = await EtcdStore.connect(
                self._settings.etcd_endpoints,
                self._settings.cluster_name,
                self._settings.etcd_timeout_s,
            )
            namespace = ray_namespace(self._settings.cluster_name)
            placement = RayPlacement(
                namespace,
                self._settings.data_dir,
                self._settings.shard,
                dict(self._settings.shard_resources),
                self._settings.vectorizer_replicas,
                self._settings.shard_hosts_per_node,
            )
            coordinator = Coordinator(store, placement, self._settings)
            await coordinator.start()
            coordinator.start_background()  # catch-up of stale replicas, placement rewrites
            # Every Ray node's membership (node agents), before the first caller sees us.
            membership = MembershipMonitor(
                store,
                RayNodeAgents(namespace, self._settings),
                coordinator.router,
                self._settings.membership_interval_s,
            )
            await membership.tick()
            membership.start()
            self._store, self._membership = store, membership
            self._coordinator = coordinator
            return coordinator

    @staticmethod
    def _whereabouts() -> dict[str, Any]:
        return {
            "node_id": ray_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
        }

    async def start(self) -> bool:
        await self._core()
        return True

    async def whereabouts(self) -> dict[str, Any]:
        """This actor's node id, host name and pid."""
        return self._whereabouts()

    async def host(self, server: HostedServer, owner: str) -> dict[str, Any]:
        """Run ``server`` in this actor's event loop, replacing (and draining) the one hosted
        before; returns where it runs once it accepts connections. ``owner`` names who asked
        (``hosting`` reports it; ``unhost(owner)`` stops only its own). A server that fails to
        start raises its error here."""
        await self._core()  # serve only once the coordinator can answer
        async with self._host_lock:
            return await self._host(server, owner)

    async def _host(self, server: HostedServer, owner: str) -> dict[str, Any]:
        await self._stop_hosted()
        started = asyncio.Event()
        task = asyncio.get_running_loop().create_task(server.run(self, started))
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait(
            {task, waiter}, timeout=HOST_START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if not started.is_set():
            waiter.cancel()
            if task.done():
                task.result()  # its error: the port is taken, a bad certificate, ...
                raise InternalError("the hosted server ended before it started")
            server.stop()
            task.cancel()
            raise DeadlineExceeded(
                f"the hosted server did not start in {HOST_START_TIMEOUT_S:.0f} s"
            )
        self._hosted = (owner, server, task)
        return {**self._whereabouts(), "owner": owner}

    async def unhost(self, owner: str | None = None) -> bool:
        """Stop the hosted server and wait until it has drained (only if ``owner`` hosted it,
        when given). False when there was nothing of theirs to stop."""
        async with self._host_lock:
            if self._hosted is None or (owner is not None and self._hosted[0] != owner):
                return False
            await self._stop_hosted()
            return True

    async def hosting(self) -> str | None:
        """The owner of the running hosted server; None when none runs (none was hosted since
        this actor started, it was stopped, or it failed)."""
        if self._hosted is None or self._hosted[2].done():
            return None
        return self._hosted[0]

    async def _stop_hosted(self) -> None:
        if self._hosted is None:
            return
        _, server, task = self._hosted
        self._hosted = None
        server.stop()
        with contextlib.suppress(Exception):  # its failure was the caller's to see earlier
            await task

    async def create_collection(self, raw: Mapping[str, Any]) -> CollectionSpec:
        return await (await self._core()).create_collection(raw)

    async def get_collection(self, name: str) -> CollectionSpec:
        return (await self._core()).spec(name)

    async def describe_collection(self, name: str) -> dict[str, Any]:
        return await (await self._core()).describe_collection(name)

    async def quality(
        self,
        name: str,
        vector: str | None,
        k: int | None,
        queries: int,
        seed: int | None,
        detail: bool = False,
    ) -> dict[str, Any]:
        return await (await self._core()).quality(name, vector, k, queries, seed, detail)

    async def list_collections(self) -> list[CollectionSpec]:
        return await (await self._core()).list_collections()

    async def delete_collection(self, name: str) -> None:
        await (await self._core()).delete_collection(name)

    async def upsert(
        self,
        collection: str,
        objects: Sequence[ObjectInput] | ColumnarInput,
        api_keys: Mapping[str, str] | None = None,
        consistency_level: str | None = None,
    ) -> list[WriteResult]:
        core = await self._core()
        try:
            results = await core.upsert(collection, objects, api_keys, consistency_level)
        except Exception as exc:
            self._metrics.record_writes(collection, None, exc, len(objects))
            raise
        self._metrics.record_writes(collection, results, None, len(objects))
        return results

    async def delete_where(
        self,
        collection: str,
        raw_filter: Mapping[str, Any],
        dry_run: bool,
        consistency_level: str | None = None,
    ) -> dict[str, Any]:
        return await (await self._core()).delete_where(
            collection, raw_filter, dry_run, consistency_level
        )

    async def get_object(self, collection: str, uuid: str, include_vector: bool) -> StoredObject:
        return await (await self._core()).get_object(collection, uuid, include_vector)

    async def delete_object(
        self, collection: str, uuid: str, consistency_level: str | None = None
    ) -> bool:
        return await (await self._core()).delete_object(collection, uuid, consistency_level)

    async def repair_once(self) -> dict[str, Any]:
        """One catch-up round now (the background loop runs it every second)."""
        return await (await self._core()).repair_once()

    async def list_objects(
        self, collection: str, after: str | None, limit: int, include_vector: bool
    ) -> list[StoredObject]:
        return await (await self._core()).list_objects(collection, after, limit, include_vector)

    async def query(self, req: QueryRequest) -> QueryResult:
        core = await self._core()
        start = time.perf_counter()
        try:
            result = await core.query(req)
        except Exception as exc:
            self._metrics.record_query(req.collection, _kind(req), time.perf_counter() - start, exc)
            raise
        self._metrics.record_query(
            req.collection,
            _kind(req),
            time.perf_counter() - start,
            None,
            len(result.missing_shards),
        )
        return result

    async def cluster_info(self) -> dict[str, Any]:
        """Members (the coordinator's node gets the ``coordinator`` role), placements with
        availability and per-replica object/token counts, and the unavailable shards."""
        info = await (await self._core()).cluster_info()
        here = self._whereabouts()
        members = {node: dict(m) for node, m in info.get("members", {}).items()}
        if here["node_id"] in members:
            roles = list(members[here["node_id"]].get("roles", []))
            members[here["node_id"]]["roles"] = ["coordinator", *roles]
        return {**info, "members": members, "coordinator": here}

    async def readiness(self) -> dict[str, Any]:
        return await (await self._core()).readiness()

    async def membership_tick(self) -> dict[str, Any]:
        """One membership round now (the background loop runs one every few seconds)."""
        await self._core()
        assert self._membership is not None
        return await self._membership.tick()

    async def backup(
        self, backup_id: str, collections: Sequence[str] | None = None, wait: bool = True
    ) -> dict[str, Any]:
        return await (await self._core()).backup(backup_id, collections, wait)

    async def list_backups(self) -> list[dict[str, Any]]:
        return await (await self._core()).list_backups()

    async def get_backup(self, backup_id: str) -> dict[str, Any]:
        return await (await self._core()).get_backup(backup_id)

    async def delete_backup(self, backup_id: str) -> None:
        await (await self._core()).delete_backup(backup_id)

    async def restore(
        self, backup_id: str, collection: str, new_name: str | None = None
    ) -> dict[str, Any]:
        return await (await self._core()).restore(backup_id, collection, new_name)

    async def move_replica(
        self, name: str, shard: int, replica: int, to_node: str
    ) -> dict[str, Any]:
        return await (await self._core()).move_replica(name, shard, replica, to_node)

    async def drain_node(self, node_id: str) -> dict[str, Any]:
        return await (await self._core()).drain_node(node_id)

    async def undrain_node(self, node_id: str) -> dict[str, Any]:
        return await (await self._core()).undrain_node(node_id)


if TYPE_CHECKING:  # mypy checks that the actor serves every verb the gateway calls
    _API: type[CoordinatorAPI] = CoordinatorActor


def _kind(req: QueryRequest) -> str:
    try:
        return req.kind()
    except Exception:  # malformed request: the coordinator rejects it; still count it
        return "invalid"
