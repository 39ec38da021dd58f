"""Replica moves and node drains (``coordinator.moves``) over in-process engines, one data
directory per fake node: writes and queries keep going during a move, nothing acknowledged is
lost, routing ends on the new node and the old copy is gone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import InvalidInput, NotFound
from cluster.ids import ShardId
from cluster.query import QueryRequest
from cluster.settings import Settings, ShardSettings
from cluster.spec import CollectionSpec
from cluster.validation import ObjectInput
from coordinator.service import Coordinator
from shard.engine import ShardEngine
from tests.unit.test_coordinator import EngineClient, EnginePlacement, MemoryStore, run

NODES = ("node-a", "node-b", "node-c")
SPEC = {
    "name": "Docs",
    "properties": [{"name": "n", "data_type": "int"}],
    "vectors": [{"name": "mv", "dim": 8, "metric": "dot"}],
    "shard_count": 2,
}


class NodeClient(EngineClient):
    def __init__(self, engine: ShardEngine, shard_id: ShardId, node: str) -> None:
        super().__init__(engine, shard_id)
        self.node = node
        self.dropped = False

    async def ready(self, timeout_s: float) -> Mapping[str, Any]:
        self._check()
        return {"pid": 0, "node_id": self.node, "data_lost": None}

    async def drop(self, timeout_s: float) -> None:
        self.dropped = True
        await super().drop(timeout_s)


class NodePlacement(EnginePlacement):
    """Replicas on fake nodes: ``root/<node>/<collection>/<shard>-<replica>``; new replicas
    go to the first node (``node-a``) unless moved."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.where: dict[tuple[str, int, int], str] = {}
        self.cordoned: frozenset[str] = frozenset()

    def _engine_client(self, spec: CollectionSpec, shard: int, replica: int, node: str) -> Any:
        engine = ShardEngine(
            spec,
            shard,
            self.root / node / spec.name / f"{shard}-{replica}",
            ShardSettings(fsync=False),
        )
        return NodeClient(engine, ShardId(spec.name, shard), node)

    def open_shard(
        self,
        spec: CollectionSpec,
        shard: int,
        replica: int,
        node_id: str = "",
        existed: bool = False,
    ) -> Any:
        key = (spec.name, shard, replica)
        node = self.where.setdefault(key, node_id or NODES[0])
        client = self.clients.get(key)
        if client is None or client.node != node:  # type: ignore[attr-defined]
            client = self.clients[key] = self._engine_client(spec, shard, replica, node)
        return client

    def open_on(self, spec: CollectionSpec, shard: int, replica: int, node_id: str) -> Any:
        client = self._engine_client(spec, shard, replica, node_id)
        self.pending = client
        return client

    def moved(self, spec: CollectionSpec, shard: int, replica: int, node_id: str) -> None:
        key = (spec.name, shard, replica)
        self.where[key] = node_id
        if getattr(self, "pending", None) is not None and self.pending.node == node_id:
            self.clients[key] = self.pending  # the copy opened there is the one that serves

    def choose_target(
        self, spec: CollectionSpec, shard: int, replica: int, leaving: str
    ) -> str | None:
        for node in NODES:
            if node != leaving and node not in self.cordoned:
                return node
        return None

    def refusal(self, spec: CollectionSpec, shard: int, replica: int, node_id: str) -> Any:
        return None if node_id in NODES else f"node {node_id!r} is not an alive node"

    def cordon(self, node_id: str, on: bool = True) -> frozenset[str]:
        self.cordoned = self.cordoned | {node_id} if on else self.cordoned - {node_id}
        return self.cordoned

    def alive_shard_nodes(self) -> dict[str, int | None]:
        return dict.fromkeys(NODES)

    def loads(self) -> dict[str, tuple[int, int | None]]:
        counts = {n: 0 for n in NODES if n not in self.cordoned}
        for node in self.where.values():
            if node in counts:
                counts[node] += 1
        return {n: (c, None) for n, c in counts.items()}


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    placement = NodePlacement(tmp_path)
    coord = Coordinator(MemoryStore(), placement, Settings(data_dir=tmp_path))
    coord.placement = placement  # type: ignore[attr-defined]
    coord.mover._drop_grace_s = 0.05  # reads here are in-process and short
    return coord


def _objects(rng: np.random.Generator, n: int, base: int) -> list[ObjectInput]:
    return [
        ObjectInput(
            str(uuid.UUID(int=base + i + 1)),
            {"n": base + i},
            {"mv": rng.normal(size=(int(rng.integers(2, 5)), 8)).astype(np.float32)},
        )
        for i in range(n)
    ]


def _node_of(coord: Coordinator, shard: int) -> str:
    return next(e.node_id for e in coord.router.table.entries("Docs") if e.id.shard == shard)


async def _move_under_load(coord: Coordinator, rng: np.random.Generator) -> dict[str, Any]:
    await coord.create_collection(SPEC)
    first = _objects(rng, 120, 0)
    assert all(r.ok for r in await coord.upsert("Docs", first))
    acked = {o.uuid for o in first}
    stop = asyncio.Event()
    failures: list[str] = []

    async def writer() -> None:
        k = 1000
        while not stop.is_set():
            batch = _objects(rng, 5, k)
            k += 5
            results = await coord.upsert("Docs", batch)
            acked.update(o.uuid for o, r in zip(batch, results, strict=True) if r.ok)
            await asyncio.sleep(0)

    async def reader() -> None:
        q = rng.normal(size=(2, 8)).astype(np.float32)
        while not stop.is_set():
            try:
                res = await coord.query(QueryRequest("Docs", near_vector=q, limit=10))
                if len(res.objects) != 10:
                    failures.append(f"short answer: {len(res.objects)}")
            except Exception as exc:
                failures.append(repr(exc))
            await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(writer()), asyncio.ensure_future(reader())]
    await asyncio.sleep(0.05)
    moved = await coord.move_replica("Docs", 0, 0, "node-b")
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    assert not failures, failures[:3]
    stored = set()
    for s in range(2):
        entry = next(e for e in coord.router.table.entries("Docs") if e.id.shard == s)
        stored |= {o.uuid for o in await entry.client.list_objects(None, 100_000, False, 5.0)}
    assert stored == acked  # every acknowledged write, on the new copy too
    return moved


def test_a_move_under_writes_and_queries_loses_nothing(coordinator: Coordinator) -> None:
    rng = np.random.default_rng(1)
    placement = coordinator.placement  # type: ignore[attr-defined]
    moved = run(_move_under_load(coordinator, rng))
    assert moved["from_node"] == "node-a" and moved["to_node"] == "node-b"
    assert moved["copied"]["copied"] >= 1 and moved["old_copy_dropped"] is True
    assert _node_of(coordinator, 0) == "node-b" and _node_of(coordinator, 1) == "node-a"
    assert not (placement.root / "node-a" / "Docs" / "0-0").exists()  # the old copy is gone
    assert (placement.root / "node-b" / "Docs" / "0-0").is_dir()
    record = run(coordinator._store.get_placements("Docs"))[(0, 0)]  # type: ignore[attr-defined]
    assert record["node_id"] == "node-b" and record["state"] == "ready"


def test_move_refuses_what_it_cannot_do(coordinator: Coordinator) -> None:
    run(coordinator.create_collection(SPEC))
    with pytest.raises(InvalidInput, match="already"):
        run(coordinator.move_replica("Docs", 0, 0, "node-a"))
    with pytest.raises(InvalidInput, match="not an alive node"):
        run(coordinator.move_replica("Docs", 0, 0, "node-x"))
    with pytest.raises(NotFound, match="no shard 5"):
        run(coordinator.move_replica("Docs", 5, 0, "node-b"))
    with pytest.raises(InvalidInput, match="no replica 1"):
        run(coordinator.move_replica("Docs", 0, 1, "node-b"))
    with pytest.raises(NotFound):
        run(coordinator.move_replica("Nope", 0, 0, "node-b"))
    assert _node_of(coordinator, 0) == "node-a"  # nothing changed


def test_drain_moves_everything_off_a_node_and_undrain_lifts_the_cordon(
    coordinator: Coordinator,
) -> None:
    rng = np.random.default_rng(2)
    run(coordinator.create_collection(SPEC))
    objs = _objects(rng, 50, 0)
    assert all(r.ok for r in run(coordinator.upsert("Docs", objs)))
    out = run(coordinator.drain_node("node-a"))
    assert out["replicas_left"] == 0 and not out["failed"] and len(out["moved"]) == 2
    assert {_node_of(coordinator, s) for s in range(2)} == {"node-b"}
    placement = coordinator.placement  # type: ignore[attr-defined]
    assert placement.cordoned == {"node-a"}
    q = objs[7].vectors["mv"]
    res = run(coordinator.query(QueryRequest("Docs", near_vector=q, limit=1)))
    assert res.objects[0].uuid == objs[7].uuid
    assert run(coordinator.undrain_node("node-a"))["cordoned"] is False
    with pytest.raises(NotFound, match="node-x"):
        run(coordinator.drain_node("node-x"))
    assert placement.cordoned == frozenset()


def test_rebalancing_spreads_replicas_one_move_at_a_time(coordinator: Coordinator) -> None:
    rng = np.random.default_rng(3)
    run(coordinator.create_collection({**SPEC, "shard_count": 4}))
    objs = _objects(rng, 80, 0)
    assert all(r.ok for r in run(coordinator.upsert("Docs", objs)))
    moves = []
    while (step := run(coordinator.mover.rebalance_once())) is not None:
        moves.append(step)
        assert len(moves) <= 4
    assert [m["to_node"] for m in moves] == ["node-b", "node-c"]  # 4-0-0 → 2-1-1
    nodes = [_node_of(coordinator, s) for s in range(4)]
    assert sorted(nodes.count(n) for n in NODES) == [1, 1, 2]
    stored = set()
    for e in coordinator.router.table.entries("Docs"):
        stored |= {o.uuid for o in run(e.client.list_objects(None, 1000, False, 5.0))}
    assert stored == {o.uuid for o in objs}
