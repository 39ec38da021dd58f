"""MembershipMonitor with an in-memory store, fake node agents and fake shard clients; the
``colshard status`` text; node roles; --shard-resources parsing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from cluster.errors import NotFound, Unavailable
from cluster.ids import ShardId
from cluster.settings import Settings
from cluster.spec import CollectionSpec
from cluster.types import ShardStats
from coordinator.membership import MembershipMonitor
from coordinator.node_agent import member_info, node_roles
from coordinator.replication import ReplicaSet
from coordinator.routing import ReplicaEntry, ReplicaId, ReplicaState, Router
from coordinator.views import cluster_view, replica_stats
from gateway.cli import parse_resources
from gateway.status import format_status

pytestmark = pytest.mark.anyio


class Store:
    """Members, and the placement records the router writes (coordinator.routing)."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        self.placements: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
        self.writes = 0

    async def list_members(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.members.items()}

    async def put_placement(
        self, collection: str, shard: int, replica: int, info: Mapping[str, Any]
    ) -> None:
        if collection not in self.placements:
            raise NotFound(collection)
        self.writes += 1
        self.placements[collection][(shard, replica)] = dict(info)


class Agents:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.nodes: dict[str, dict[str, Any]] = {}
        self.started: list[str] = []
        self.broken: set[str] = set()

    async def alive_nodes(self) -> dict[str, dict[str, Any]]:
        return dict(self.nodes)

    async def ensure(self, node_id: str, node: Mapping[str, Any]) -> None:
        if node_id in self.broken:
            raise Unavailable("no worker")
        self.started.append(node_id)
        self.store.members[node_id] = {"roles": ["shards"]}


class Client:
    def __init__(self, shard: int, node_id: str | None) -> None:
        self.shard_id = ShardId("C", shard)
        self.node_id = node_id  # None: does not answer
        self.data_lost: str | None = None

    async def ready(self, timeout_s: float) -> Mapping[str, Any]:
        if self.node_id is None:
            raise Unavailable("restarting")
        return {"node_id": self.node_id, "host": "h", "pid": 1}

    async def stats(self, timeout_s: float) -> ShardStats:
        return ShardStats(
            shard=self.shard_id.shard,
            n_objects=0 if self.data_lost else 5,
            n_tokens={"v": 20},
            n_segments=1,
            data_lost=self.data_lost,
        )


SPEC = CollectionSpec.from_dict(
    {"name": "C", "shard_count": 2, "vectors": [{"name": "v", "dim": 4}]}
)


@pytest.fixture
async def world() -> tuple[Store, Agents, list[Client], MembershipMonitor]:
    store = Store()
    agents = Agents(store)
    agents.nodes = {"node-a": {}, "node-b": {}}
    clients = [Client(0, "node-a"), Client(1, "node-b")]
    store.placements["C"] = {}
    router = Router(store)
    entries = [
        ReplicaEntry(ReplicaId("C", s, 0), c, actor=f"colshard:C:{s}", node_id=str(c.node_id))
        for s, c in enumerate(clients)
    ]
    router.add_collection(SPEC, entries, [ReplicaSet.over(router, [e]) for e in entries])
    assert await router.flush() == 0
    store.writes = 0
    monitor = MembershipMonitor(store, agents, router)
    return store, agents, clients, monitor


def view(monitor: MembershipMonitor, stats: Any) -> dict[str, Any]:
    return cluster_view(monitor._router.table, {}, stats, monitor._router.last_ok_seq)


async def settled(monitor: MembershipMonitor) -> None:
    """The router's background placement writes are done."""
    assert await monitor._router.flush() == 0


async def test_agents_started_on_nodes_that_are_not_members(world: Any) -> None:
    store, agents, _, monitor = world
    store.members["node-a"] = {}
    result = await monitor.tick()
    assert agents.started == ["node-b"] and result["members"] == ["node-a", "node-b"]
    await settled(monitor)
    assert result["unavailable"] == [] and store.writes == 0  # healthy: no probe, no write
    agents.broken.add("node-c")
    agents.nodes["node-c"] = {}
    assert (await monitor.tick())["agents_started"] == []  # retried next round, no crash


async def test_node_loss_marks_shard_unavailable_then_ready_again(world: Any) -> None:
    store, agents, clients, monitor = world
    await monitor.tick()
    version = monitor._router.table.version
    # node-b dies: Ray no longer lists it, its member key expired, its shard does not answer.
    del agents.nodes["node-b"], store.members["node-b"]
    clients[1].node_id = None
    result = await monitor.tick()
    assert result["unavailable"] == ["C:1:0"] and result["changed"] == ["C:1:0"]
    table = monitor._router.table
    assert table.version == version + 1 and table.unavailable_shards() == ["C:1"]
    await settled(monitor)
    record = store.placements["C"][(1, 0)]
    assert record["state"] == "unavailable" and "node-b" in record["reason"]
    assert record["previous_state"] == "ready"
    writes = store.writes
    await monitor.tick()
    await settled(monitor)
    assert store.writes == writes and monitor._router.table is table  # already recorded

    shown = view(monitor, await replica_stats(monitor._router.table))
    states = [p["state"] for p in shown["collections"]["C"]["placements"]]
    assert states == ["ready", "unavailable"] and shown["unavailable_shards"] == ["C:1"]
    assert shown["collections"]["C"]["objects"] == 5
    assert shown["collections"]["C"]["placements"][0]["tokens"] == 20

    # Ray restarts the actor on node-a (or node-b comes back): ready again, on that node.
    clients[1].node_id = "node-a"
    result = await monitor.tick()
    assert result["unavailable"] == [] and result["changed"] == ["C:1:0"]
    await settled(monitor)
    record = store.placements["C"][(1, 0)]
    assert record["state"] == "ready" and record["node_id"] == "node-a"
    assert "reason" not in record and monitor._router.table.unavailable_shards() == []


async def test_a_replica_without_its_data_shows_as_data_lost(world: Any) -> None:
    store, _, clients, monitor = world
    await monitor.tick()
    clients[1].data_lost = "shard C:1 was restarted on node n9 with an empty data directory"
    shown = view(monitor, await replica_stats(monitor._router.table))
    placements = shown["collections"]["C"]["placements"]
    assert [p["state"] for p in placements] == ["ready", "data_lost"]
    assert "empty data directory" in placements[1]["reason"]
    await settled(monitor)
    assert store.placements["C"][(1, 0)]["state"] == "ready"  # shown, never stored


async def test_stale_state_survives_an_outage(world: Any) -> None:
    store, agents, clients, monitor = world
    rid = ReplicaId("C", 1, 0)
    monitor._router.update(rid, sync=ReplicaState.STALE)
    await monitor.tick()
    del store.members["node-b"], agents.nodes["node-b"]
    clients[1].node_id = None
    await monitor.tick()
    await settled(monitor)
    assert store.placements["C"][(1, 0)]["previous_state"] == "stale"
    clients[1].node_id = "node-a"
    await monitor.tick()
    await settled(monitor)
    assert store.placements["C"][(1, 0)]["state"] == "stale"
    assert monitor._router.table.replicas[rid].state == ReplicaState.STALE


async def test_dropped_collection_is_forgotten(world: Any) -> None:
    store, agents, clients, monitor = world
    await monitor.tick()
    del store.members["node-b"], agents.nodes["node-b"]
    clients[1].node_id = None
    await monitor.tick()
    monitor._router.drop_collection("C")
    del store.placements["C"]
    result = await monitor.tick()
    assert result["unavailable"] == [] and monitor._router.table.unavailable_shards() == []
    assert await monitor._router.flush() == 0


def test_node_roles_and_member_info(tmp_path: Any) -> None:
    head = {"node:__internal_head__": 1.0, "CPU": 1.0}
    assert node_roles(head, {}) == ["head", "shards"]
    assert node_roles(head, {"colshard_shard": 1}) == ["head"]
    assert node_roles({"colshard_shard": 2.0}, {"colshard_shard": 1}) == ["shards"]
    assert node_roles({}, {"colshard_shard": 1}) == ["worker"]
    info = member_info(
        "abc",
        {"address": "10.0.0.2", "resources": {"CPU": 2, "node:x": 1}},
        Settings(data_dir=tmp_path),
    )
    assert info["resources"] == {"CPU": 2.0} and info["address"] == "10.0.0.2"
    assert info["node_id"] == "abc" and info["roles"] == ["shards"]


def test_parse_resources() -> None:
    assert parse_resources("") == {}
    assert parse_resources('{"colshard_shard": 1}') == {"colshard_shard": 1.0}
    with pytest.raises(SystemExit):
        parse_resources("[1]")


def test_status_text() -> None:
    cluster = {
        "coordinator": {"node_id": "aaaaaaaa1111", "host": "host-a", "pid": 7},
        "members": {
            "aaaaaaaa1111": {
                "host": "host-a",
                "address": "10.0.0.1",
                "roles": ["coordinator", "head"],
                "resources": {"CPU": 1.0, "memory": 1e9},
            }
        },
        "collections": {
            "Demo": {
                "shard_count": 2,
                "replication_factor": 1,
                "objects": 7,
                "placements": [
                    {
                        "shard": 0,
                        "replica": 0,
                        "actor": "colshard:Demo:0",
                        "shard_host": "colshard:host:aaaaaaaa",
                        "node_id": "aaaaaaaa1111",
                        "host": "host-a",
                        "state": "ready",
                        "objects": 7,
                        "tokens": 70,
                    },
                    {
                        "shard": 1,
                        "replica": 0,
                        "actor": "colshard:Demo:1",
                        "node_id": "bbbbbbbb2222",
                        "host": "host-b",
                        "state": "unavailable",
                    },
                ],
            }
        },
    }
    text = format_status(
        cluster, {"ready": False, "etcd": True, "unavailable_shards": ["Demo:1"]}, "prod"
    )
    lines = text.splitlines()
    assert lines[0] == "cluster prod: NOT READY  (etcd ok; unavailable shards: Demo:1)"
    assert "coordinator on node aaaaaaaa (host-a, pid 7)" in text
    member = next(line for line in lines if line.startswith("aaaaaaaa"))
    assert member.split() == ["aaaaaaaa", "host-a", "10.0.0.1", "coordinator,head", "1", "CPU=1"]
    gone = next(line for line in lines if line.startswith("1 "))
    assert "host-b (gone)" in gone and "unavailable" in gone and gone.split()[-2:] == ["-", "-"]
    assert "COLLECTION Demo  shards=2  replication=1  objects=7" in text
    first = next(line for line in lines if line.startswith("0 "))
    assert first.split()[:4] == ["0", "0", "colshard:Demo:0", "colshard:host:aaaaaaaa"]
    assert format_status({}, None).endswith("no collections")


def test_vectorizer_replicas_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import build_parser, settings_from_args

    parser = build_parser()
    monkeypatch.delenv("COLSHARD_VECTORIZER_REPLICAS", raising=False)
    assert settings_from_args(parser.parse_args(["gateway"])).vectorizer_replicas == 1
    monkeypatch.setenv("COLSHARD_VECTORIZER_REPLICAS", "3")
    assert settings_from_args(parser.parse_args(["gateway"])).vectorizer_replicas == 3
    args = parser.parse_args(["gateway", "--vectorizer-replicas", "2"])
    assert settings_from_args(args).vectorizer_replicas == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["gateway", "--vectorizer-replicas", "0"])
