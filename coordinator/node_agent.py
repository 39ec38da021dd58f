"""Node agents: one small detached actor per Ray node that holds the node's membership in etcd.

``NodeAgentActor`` runs on exactly one node (hard node affinity, ``num_cpus=0``), named
``colshard:node:<node_id[:8]>`` in the cluster's Ray namespace. It writes
``members/<node_id>`` (host, address, roles, resources, data dir) bound to a lease of
``Settings.member_ttl_s`` and keeps the lease alive. When the node dies its worker processes die
with it, nobody refreshes the lease, and etcd deletes the key after the TTL: that deletion is how
the rest of colshard learns the node is gone. ``ray.kill`` of the agent has the same effect.

``RayNodeAgents`` is the Ray side of the reconciliation that ``coordinator.membership`` drives:
which nodes are alive, and "make sure this node has a registered agent". All of the node agents'
Ray API calls live here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.etcd_store import EtcdStore, MemberLease
from cluster.ids import ACTOR_PREFIX
from cluster.settings import Settings, node_data_dir

HEAD_RESOURCE = "node:__internal_head__"
AGENT_START_TIMEOUT_S = 60.0


def agent_name(node_id: str) -> str:
    return f"{ACTOR_PREFIX}:node:{node_id[:8]}"


def node_roles(resources: Mapping[str, float], shard_resources: Mapping[str, float]) -> list[str]:
    """``head`` for the Ray head; ``shards`` for nodes that can host shard actors (they have
    every resource a shard requests; any node when shards request none)."""
    roles = ["head"] if HEAD_RESOURCE in resources else []
    if all(resources.get(name, 0.0) >= amount for name, amount in shard_resources.items()):
        roles.append("shards")
    return roles or ["worker"]


def member_info(node_id: str, node: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """What the agent registers under ``members/<node_id>`` (JSON)."""
    resources = {
        str(k): float(v)
        for k, v in dict(node.get("resources") or {}).items()
        if not str(k).startswith("node:")
    }
    return {
        "node_id": node_id,
        "host": socket.gethostname(),
        "address": str(node.get("address") or ""),
        "roles": node_roles(dict(node.get("resources") or {}), settings.shard_resources),
        "resources": dict(sorted(resources.items())),
        "data_dir": str(node_data_dir(settings.data_dir)),
        "agent_pid": os.getpid(),
        "started": time.time(),
    }


class NodeAgentActor:
    """Holds ``members/<node_id>`` for the node it runs on (see the module docstring)."""

    def __init__(self, settings: Settings, node_id: str, node: Mapping[str, Any]) -> None:
        self._settings = settings
        self._node_id = node_id
        self._node = dict(node)
        self._store: EtcdStore | None = None
        self._lease: MemberLease | None = None
        self._info: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> dict[str, Any]:
        """Register (idempotent). Raises colshard errors (etcd unreachable: Unavailable); the
        coordinator retries on its next reconciliation round."""
        async with self._lock:
            if self._lease is not None and self._lease.active:
                return self._info
            if self._store is None:
                self._store = await EtcdStore.connect(
                    self._settings.etcd_endpoints,
                    self._settings.cluster_name,
                    self._settings.etcd_timeout_s,
                )
            self._info = member_info(self._node_id, self._node, self._settings)
            self._lease = await self._store.register_member(
                self._node_id, self._info, ttl_s=self._settings.member_ttl_s
            )
            return self._info

    async def info(self) -> dict[str, Any]:
        return dict(self._info, active=self._lease is not None and self._lease.active)

    async def stop(self) -> None:
        """Leave now: revoke the lease (the member key disappears at once) and close."""
        async with self._lock:
            if self._store is not None:
                await self._store.close()  # revokes the lease
            self._store = self._lease = None


class RayNodeAgents:
    """Starts node agents on Ray nodes (the ``NodeAgents`` of ``coordinator.membership``)."""

    def __init__(self, namespace: str, settings: Settings) -> None:
        self._namespace = namespace
        self._settings = settings
        self._remote_cls: Any = ray.remote(NodeAgentActor)

    async def alive_nodes(self) -> dict[str, dict[str, Any]]:
        """node id -> {"address", "hostname", "resources"} of every alive Ray node."""
        nodes = await asyncio.to_thread(ray.nodes)
        return {
            n["NodeID"]: {
                "address": n.get("NodeManagerAddress", ""),
                "hostname": n.get("NodeManagerHostname", ""),
                "resources": dict(n.get("Resources") or {}),
            }
            for n in nodes
            if n.get("Alive")
        }

    def _handle(self, node_id: str, node: Mapping[str, Any]) -> Any:
        return self._remote_cls.options(
            name=agent_name(node_id),
            namespace=self._namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,  # a crashed agent comes back on its node; a dead node takes it along
            max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self._settings, node_id, dict(node))

    async def ensure(self, node_id: str, node: Mapping[str, Any]) -> None:
        """Create the node's agent if absent and wait until it has registered."""
        handle = await asyncio.to_thread(self._handle, node_id, node)
        async with asyncio.timeout(AGENT_START_TIMEOUT_S):
            await handle.start.remote()
