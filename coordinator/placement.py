"""Shard placement: which node each shard replica lives on, and the shard hosts holding them.

Every node that holds shards runs a **shard host** (``shard.host.ShardHost``), a detached
actor named ``colshard:host:<node_id[:8]>``, pinned to its node (hard affinity) and restarted
there when it crashes (``max_restarts=-1``). The shard replicas placed on a node are engines
inside its host, each still with its own data directory under the node's data dir, its WAL,
its placement record and its name (``colshard:<collection>:<shard>[:<replica>]``). Shard
``s`` goes to the node's host ``s % hosts_per_node`` (``Settings.shard_hosts_per_node``), so
that a collection's shards search in parallel processes; replica ``r`` ≥ 1 to the node's hosts
for that replica index, so that where replicas of one shard share a node (fewer nodes than
replicas, e.g. one machine) a crash takes only one of them (``host_name``). A node runs at most
``hosts_per_node`` hosts per replica index it holds, whatever the number of collections.

**Choosing a node** (``choose_node``), when a replica is first opened or its node is gone:

1. a replica keeps the node it is on while that node is alive (and the node recorded in its
   placement record, after a coordinator restart);
2. otherwise, among the alive nodes that advertise ``Settings.shard_resources`` and have room,
   it goes where no other replica of the same shard is, then where its collection has the
   fewest replicas, then where the fewest replicas are, then by node id.

**Room.** With ``shard_resources`` set (e.g. ``{"colshard_shard": 1}``) a node holds at most
``floor(its amount / the amount asked)`` replicas, the least over the resources named (the
multi-node test gives each node room for one). Without it every alive node qualifies and
there is no cap. That is colshard's own accounting: a host asks Ray for only a sliver of each
resource (``HOST_RESOURCE_SHARE``), which keeps Ray's autoscaler from removing a node whose
host holds shard data.

A replica with no node to go to answers ``Unavailable`` until one is (its client asks again).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.ids import ACTOR_PREFIX, ShardId
from cluster.settings import ShardSettings
from cluster.spec import CollectionSpec, VectorizerSpec
from coordinator.fanout import RayShardClient, RayVectorizerClient, ShardClient
from coordinator.vectorize import vectorizer_key
from coordinator.vectorizers.actor import VectorizerActor
from shard.host import ShardHost

SHARD_MAX_RESTARTS = 5
# Threads of a shard host: calls in flight over Ray across all the shards of its node.
HOST_MAX_CONCURRENCY = 64
HOST_RESOURCE_SHARE = 0.001  # of each of Settings.shard_resources, asked by a shard host


def actor_name(spec: CollectionSpec, shard: int, replica: int) -> str:
    sid = ShardId(spec.name, shard)
    return sid.actor_name(replica if spec.replication_factor > 1 else None)


def host_name(node_id: str, replica: int = 0, slot: int = 0) -> str:
    """Shard host ``slot`` of ``node_id`` for the ``replica``-th replicas of shards: replicas of
    one shard that share a node (fewer nodes than replicas) still run in different processes."""
    base = f"{ACTOR_PREFIX}:host:{node_id[:8]}"
    return base + (f":{slot}" if slot else "") + (f":r{replica}" if replica else "")


def shard_data_dir(data_dir: Path, spec: CollectionSpec, shard: int, replica: int) -> Path:
    base = data_dir / spec.name / str(shard)
    return base if spec.replication_factor == 1 else base.with_name(f"{shard}-r{replica}")


def node_room(resources: Mapping[str, float], wanted: Mapping[str, float]) -> int | None:
    """How many replicas a node with ``resources`` holds (None: no cap; 0: none)."""
    if not wanted:
        return None
    return min(
        math.floor(resources.get(name, 0.0) / amount + 1e-9) if amount > 0 else 1 << 30
        for name, amount in wanted.items()
    )


@dataclass(frozen=True)
class Placed:
    """Where one replica is: its node, the shard it is a replica of, its collection."""

    node_id: str
    group: str
    collection: str


def choose_node(
    key: str,
    group: str,
    collection: str,
    nodes: Mapping[str, int | None],
    placed: Mapping[str, Placed],
    hint: str = "",
    avoid: frozenset[str] = frozenset(),
) -> str | None:
    """The node replica ``key`` (of shard ``group``) goes to, given the alive shard nodes and
    their room (``node_room``) and where every replica is (see the module docstring). Nodes in
    ``avoid`` (cordoned for a drain, or being left) take no replica that is not on them."""
    current = placed.get(key)
    for node in (current.node_id if current else "", hint):
        if node and node in nodes:
            return node
    load = dict.fromkeys(nodes, 0)
    of_collection = dict.fromkeys(nodes, 0)
    siblings: set[str] = set()
    for other, where in placed.items():
        if other == key or where.node_id not in load:
            continue
        load[where.node_id] += 1
        if where.collection == collection:
            of_collection[where.node_id] += 1
        if where.group == group:
            siblings.add(where.node_id)
    room = [n for n, cap in nodes.items() if n not in avoid and (cap is None or load[n] < cap)]
    if not room:
        return None
    return min(room, key=lambda n: (n in siblings, of_collection[n], load[n], n))


@dataclass
class _Wanted:
    spec: CollectionSpec
    shard: int
    replica: int
    hint: str
    existed: bool


class _Pinned:
    """The locator of a move's target copy: always the host of one node (``open_on``)."""

    def __init__(self, placement: RayPlacement, want: _Wanted, node_id: str) -> None:
        self._placement = placement
        self._want = want
        self._node_id = node_id

    def locate(self, key: str, host_died: bool = False) -> tuple[Any, tuple[Any, ...]] | None:
        if self._node_id not in self._placement.alive_shard_nodes():
            return None
        return self._placement.host_on(self._node_id, self._want, host_died)

    def opened(self, key: str) -> None:
        self._want.existed = True


class RayPlacement:
    """Places shard replicas on nodes and opens them in the nodes' shard hosts."""

    def __init__(
        self,
        namespace: str,
        data_dir: Path,
        shard_settings: ShardSettings,
        resources: dict[str, float] | None = None,
        vectorizer_replicas: int = 1,
        hosts_per_node: int = 2,
    ) -> None:
        self._namespace = namespace
        self._vectorizer_replicas = max(1, vectorizer_replicas)
        self._data_dir = data_dir
        self._settings = shard_settings
        self._resources = dict(resources or {})
        self._host_cls: Any = ray.remote(ShardHost)
        self._vectorizer_cls: Any = ray.remote(VectorizerActor)
        self._lock = threading.Lock()
        self._wanted: dict[str, _Wanted] = {}
        self._placed: dict[str, Placed] = {}
        # (node id, replica, slot) -> its host
        self._hosts: dict[tuple[str, int, int], Any] = {}
        self._hosts_per_node = max(1, hosts_per_node)
        self._cordoned: frozenset[str] = frozenset()

    def open_shard(
        self,
        spec: CollectionSpec,
        shard: int,
        replica: int,
        node_id: str = "",
        existed: bool = False,
    ) -> ShardClient:
        """A client for the replica; it is placed (``locate``) and opened by its first call.
        ``node_id``: the node its placement record names; ``existed``: it was created before
        (an empty data directory is then a loss)."""
        key = actor_name(spec, shard, replica)
        with self._lock:
            self._wanted[key] = _Wanted(spec, shard, replica, node_id, existed)
        return RayShardClient(ShardId(spec.name, shard), key, self)

    def alive_shard_nodes(self) -> dict[str, int | None]:
        """node id -> room (``node_room``) of every alive node that can hold shards."""
        rooms = {
            str(n["NodeID"]): node_room(dict(n.get("Resources") or {}), self._resources)
            for n in ray.nodes()  # type: ignore[no-untyped-call]
            if n.get("Alive")
        }
        return {n: room for n, room in rooms.items() if room is None or room > 0}

    def locate(self, key: str, host_died: bool = False) -> tuple[Any, tuple[Any, ...]] | None:
        """The shard host for replica ``key`` (created when absent) and the arguments of its
        ``open``; None when no alive node has room for it. ``host_died``: the host the caller
        used is dead (its node is gone, or it was killed): look again."""
        nodes = self.alive_shard_nodes()
        with self._lock:
            want = self._wanted.get(key)
            if want is None:
                raise KeyError(f"shard {key} was not opened through this placement")
            spec = want.spec
            current = self._placed.get(key)
            if host_died and current is not None:
                self._forget_host(current.node_id, want)
            group = f"{spec.name}:{want.shard}"
            node = choose_node(
                key, group, spec.name, nodes, self._placed, want.hint, self._cordoned
            )
            if node is None:
                return None
            if current is not None and current.node_id != node:
                want.existed = True  # it moves: what it held is elsewhere
            self._placed[key] = Placed(node, group, spec.name)
            handle = self._host_of(node, want)
        return handle, self._open_args(want)

    def host_on(
        self, node_id: str, want: _Wanted, host_died: bool = False
    ) -> tuple[Any, tuple[Any, ...]]:
        """``node_id``'s host for ``want`` (looked up again when the last one died) and the
        arguments of its ``open``."""
        with self._lock:
            if host_died:
                self._forget_host(node_id, want)
            handle = self._host_of(node_id, want)
        return handle, self._open_args(want)

    def _open_args(self, want: _Wanted) -> tuple[Any, ...]:
        subdir = shard_data_dir(Path(), want.spec, want.shard, want.replica).as_posix()
        data_dir = str(self._data_dir)
        return (want.spec.to_json(), want.shard, data_dir, self._settings, subdir, want.existed)

    def _slot(self, want: _Wanted) -> tuple[int, int]:
        return want.replica, want.shard % self._hosts_per_node

    def _host_of(self, node_id: str, want: _Wanted) -> Any:
        """The host of ``node_id`` for ``want``'s replica index and slot (lock held)."""
        where = (node_id, *self._slot(want))
        handle = self._hosts.get(where)
        if handle is None:
            handle = self._hosts[where] = self._host(*where)
        return handle

    def _forget_host(self, node_id: str, want: _Wanted) -> None:
        self._hosts.pop((node_id, *self._slot(want)), None)

    # ---- moves and drains ------------------------------------------------------------------

    def open_on(self, spec: CollectionSpec, shard: int, replica: int, node_id: str) -> ShardClient:
        """A client for a new copy of the replica on ``node_id`` (a move's target), beside
        the copy that serves; it opens as a new shard there (an empty directory is no loss).
        Unavailable while that node is not alive."""
        key = actor_name(spec, shard, replica)
        want = _Wanted(spec, shard, replica, node_id, existed=False)
        return RayShardClient(ShardId(spec.name, shard), key, _Pinned(self, want, node_id))

    def moved(self, spec: CollectionSpec, shard: int, replica: int, node_id: str) -> None:
        """The replica now lives on ``node_id`` (a move switched to its copy there)."""
        key = actor_name(spec, shard, replica)
        with self._lock:
            self._placed[key] = Placed(node_id, f"{spec.name}:{shard}", spec.name)
            want = self._wanted.get(key)
            if want is not None:
                want.hint, want.existed = node_id, True

    def choose_target(
        self, spec: CollectionSpec, shard: int, replica: int, leaving: str
    ) -> str | None:
        """Where the replica would go if it left node ``leaving`` (None: no node has room)."""
        key = actor_name(spec, shard, replica)
        nodes = self.alive_shard_nodes()
        nodes.pop(leaving, None)
        with self._lock:
            placed = {k: v for k, v in self._placed.items() if k != key}
            return choose_node(
                key, f"{spec.name}:{shard}", spec.name, nodes, placed, avoid=self._cordoned
            )

    def refusal(self, spec: CollectionSpec, shard: int, replica: int, node_id: str) -> str | None:
        """Why the replica cannot move to ``node_id`` (None: it can): the node is not an
        alive shard node, or it has no room left (``node_room``)."""
        nodes = self.alive_shard_nodes()
        if node_id not in nodes:
            return f"node {node_id!r} is not an alive node that holds shards"
        key = actor_name(spec, shard, replica)
        room = nodes[node_id]
        with self._lock:
            held = self._held(without=key)[node_id]
        if room is not None and held >= room:
            return f"node {node_id} has no room: it holds {held} of {room} replicas"
        return None

    def loads(self) -> dict[str, tuple[int, int | None]]:
        """node id -> (replicas placed there, room) of every alive, uncordoned shard node."""
        nodes = self.alive_shard_nodes()
        with self._lock:
            held = self._held()
            return {n: (held[n], room) for n, room in nodes.items() if n not in self._cordoned}

    def _held(self, without: str = "") -> Counter[str]:
        """Replicas placed per node, ``without`` one of them (lock held)."""
        return Counter(p.node_id for k, p in self._placed.items() if k != without)

    def cordon(self, node_id: str, on: bool = True) -> frozenset[str]:
        """Place no replica on ``node_id`` that is not there already (a drain), or again
        (``on`` False); returns the cordoned nodes."""
        with self._lock:
            self._cordoned = self._cordoned | {node_id} if on else self._cordoned - {node_id}
            return self._cordoned

    def _host(self, node_id: str, replica: int, slot: int) -> Any:
        name = host_name(node_id, replica, slot)
        return self._host_cls.options(
            name=name,
            namespace=self._namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            # A sliver of each shard resource: the node is then never idle to Ray's autoscaler
            # while a host (with its shards' data) runs there; room is counted by placement.
            resources={r: HOST_RESOURCE_SHARE for r in self._resources} or None,
            max_restarts=-1,  # a crashed host comes back on its node; a dead node takes it
            max_concurrency=HOST_MAX_CONCURRENCY,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(name, str(self._data_dir))

    def opened(self, key: str) -> None:
        """Replica ``key`` has been opened once: a later open (its host restarted, or it
        moved) is of a shard that existed."""
        with self._lock:
            want = self._wanted.get(key)
            if want is not None:
                want.existed = True

    def kill_shard(self, spec: CollectionSpec, shard: int, replica: int) -> None:
        """Forget the replica (after its drop); a host still holding it closes it."""
        key = actor_name(spec, shard, replica)
        with self._lock:
            want = self._wanted.pop(key, None)
            where = self._placed.pop(key, None)
            handle = self._hosts.get((where.node_id, *self._slot(want))) if where and want else None
        if handle is not None:
            handle.close.remote(key)  # fire and forget: a drop already closed it

    def open_vectorizer(self, spec: VectorizerSpec) -> RayVectorizerClient:
        """A pool of encoder actors per distinct vectorizer config, shared by every collection:
        ``colshard:vectorizer:<digest>`` (and ``...:<i>`` for i >= 1), spread over nodes."""
        digest = hashlib.sha1(vectorizer_key(spec).encode()).hexdigest()[:12]
        name = f"{ACTOR_PREFIX}:vectorizer:{digest}"
        handles = [
            self._vectorizer_cls.options(
                name=name if i == 0 else f"{name}:{i}",
                namespace=self._namespace,
                get_if_exists=True,
                lifetime="detached",
                num_cpus=0,
                max_restarts=SHARD_MAX_RESTARTS,
                max_concurrency=2,
                scheduling_strategy="SPREAD",
            ).remote(spec.kind, dict(spec.options))
            for i in range(self._vectorizer_replicas)
        ]
        return RayVectorizerClient(handles, name)
