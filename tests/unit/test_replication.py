"""Replication without a cluster: quorum math, quorum writes, failover reads, stale replicas and
their catch-up (deletes included), query deadlines. In-process shard engines stand behind the
ShardClient interface (see test_coordinator.py); a replica is taken "down" or made slow."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import DataLost, DeadlineExceeded, InvalidInput, Unavailable
from cluster.ids import ShardId, shard_for_uuid
from cluster.query import QueryRequest
from cluster.settings import Settings, ShardSettings
from cluster.spec import CollectionSpec
from cluster.validation import ObjectInput
from coordinator.replication import (
    READY,
    STALE,
    ReplicaSet,
    parse_consistency,
    required_acks,
    sync_replica,
)
from coordinator.service import Coordinator
from shard.engine import ShardEngine
from tests.unit.test_coordinator import EngineClient, EnginePlacement, MemoryStore

DIM = 8


class FaultyClient(EngineClient):
    """An EngineClient that can also be slow (``delay`` seconds before reads) and that, like
    RayShardClient, turns a missed deadline into DeadlineExceeded naming the shard."""

    def __init__(self, engine: ShardEngine, shard_id: ShardId) -> None:
        super().__init__(engine, shard_id)
        self.delay = 0.0
        self.write_delay = 0.0
        self.reads = 0

    async def _slow(self, delay: float, timeout_s: float) -> None:
        if delay <= 0:
            return
        try:
            await asyncio.wait_for(asyncio.sleep(delay), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"shard {self.shard_id} did not answer in time", {"shard": str(self.shard_id)}
            ) from None

    async def upsert(self, batch: Any, timeout_s: float) -> Any:
        await self._slow(self.write_delay, timeout_s)
        return await super().upsert(batch, timeout_s)

    async def get(self, uuid: str, include_vectors: bool, timeout_s: float) -> Any:
        self.reads += 1
        self._check()
        await self._slow(self.delay, timeout_s)
        return await super().get(uuid, include_vectors, timeout_s)

    async def search(self, req: Any, timeout_s: float) -> Any:
        self.reads += 1
        self._check()
        await self._slow(self.delay, timeout_s)
        return await super().search(req, timeout_s)

    async def list_objects(
        self, after: str | None, limit: int, include_vectors: bool, timeout_s: float
    ) -> Any:
        self.reads += 1
        self._check()
        await self._slow(self.delay, timeout_s)
        return await super().list_objects(after, limit, include_vectors, timeout_s)

    async def stats(self, timeout_s: float) -> Any:
        self.reads += 1
        self._check()
        await self._slow(self.delay, timeout_s)
        return await super().stats(timeout_s)


class FaultyPlacement(EnginePlacement):
    def open_shard(
        self,
        spec: CollectionSpec,
        shard: int,
        replica: int,
        node_id: str = "",
        existed: bool = False,
    ) -> FaultyClient:
        key = (spec.name, shard, replica)
        if key not in self.clients:
            engine = ShardEngine(
                spec,
                shard,
                self.root / spec.name / f"{shard}-{replica}",
                ShardSettings(fsync=False),
            )
            self.clients[key] = FaultyClient(engine, ShardId(spec.name, shard))
        client = self.clients[key]
        assert isinstance(client, FaultyClient)
        return client


def spec_raw(rf: int, shards: int = 2) -> dict[str, Any]:
    return {
        "name": "Rep",
        "properties": [{"name": "n", "data_type": "int"}],
        "vectors": [{"name": "v", "dim": DIM, "metric": "dot"}],
        "shard_count": shards,
        "replication_factor": rf,
    }


class Cluster:
    def __init__(self, root: Path, rf: int, shards: int = 2, **settings: Any) -> None:
        self.store = MemoryStore()
        self.placement = FaultyPlacement(root)
        self.coord = Coordinator(self.store, self.placement, Settings(data_dir=root, **settings))
        self.rf, self.shards = rf, shards
        self.rng = np.random.default_rng(rf)

    async def create(self) -> None:
        await self.coord.create_collection(spec_raw(self.rf, self.shards))

    def client(self, shard: int, replica: int) -> FaultyClient:
        c = self.placement.clients[("Rep", shard, replica)]
        assert isinstance(c, FaultyClient)
        return c

    def replicas(self, shard: int) -> ReplicaSet:
        return self.coord.router.table.shard_sets("Rep")[shard]

    def objects(self, n: int, base: int = 0) -> list[ObjectInput]:
        return [
            ObjectInput(
                str(uuid.UUID(int=int(self.rng.integers(1 << 62)) << 64 | i)),
                {"n": base + i},
                {"v": self.rng.normal(size=(int(self.rng.integers(1, 4)), DIM)).astype(np.float32)},
            )
            for i in range(n)
        ]

    def listing(self, shard: int, replica: int) -> dict[str, tuple[Any, bytes]]:
        engine = self.client(shard, replica).engine
        return {
            o.uuid: (dict(o.properties), o.vectors["v"].tobytes())  # type: ignore[index]
            for o in engine.list_objects(None, 100_000, True)
        }


def test_quorum_math_and_levels() -> None:
    assert [required_acks("quorum", r) for r in (1, 2, 3)] == [1, 2, 2]
    assert [required_acks("one", r) for r in (1, 2, 3)] == [1, 1, 1]
    assert [required_acks("all", r) for r in (1, 2, 3)] == [1, 2, 3]
    assert parse_consistency(None) == "quorum"
    assert parse_consistency("ALL") == "all"
    with pytest.raises(InvalidInput, match="consistency_level"):
        parse_consistency("two")


@pytest.mark.anyio
async def test_quorum_write_marks_the_missing_replica_stale(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=3, shards=1)
    await c.create()
    c.client(0, 2).down = True
    res = await c.coord.upsert("Rep", c.objects(10))
    assert all(r.ok for r in res)  # 2 of 3 is a quorum
    assert [r.state for r in c.replicas(0).replicas] == [READY, READY, STALE]
    await c.coord.flush_placements()
    assert c.store.placements["Rep"][(0, 2)]["state"] == STALE
    assert c.store.placements["Rep"][(0, 0)]["state"] == READY
    # A second replica down: quorum is out of reach, nothing is sent, 503 names the shard.
    c.client(0, 1).down = True
    with pytest.raises(Unavailable, match="Rep:0") as err:
        await c.coord.upsert("Rep", c.objects(3, base=100))
    assert err.value.details["shards"] == ["Rep:0"]
    assert c.replicas(0).replicas[1].state == STALE
    # ... but consistency "one" is still served by the one ready replica.
    res = await c.coord.upsert("Rep", c.objects(3, base=200), consistency_level="one")
    assert all(r.ok for r in res)
    with pytest.raises(InvalidInput):
        await c.coord.upsert("Rep", c.objects(1), consistency_level="most")


@pytest.mark.anyio
async def test_consistency_all_needs_every_replica(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=2, shards=1)
    await c.create()
    objs = c.objects(4)
    c.client(0, 1).down = True
    with pytest.raises(Unavailable, match=r"reached 1 of the 2 replica\(s\)"):
        await c.coord.upsert("Rep", objs, consistency_level="all")
    # The replica that applied the write keeps it; the other is stale and serves no reads.
    assert len(c.listing(0, 0)) == 4 and c.replicas(0).replicas[1].state == STALE
    with pytest.raises(Unavailable, match="Rep:0"):
        await c.coord.delete_object("Rep", objs[0].uuid or "", consistency_level="all")


@pytest.mark.anyio
async def test_reads_fail_over_to_a_live_replica(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=2, shards=2)
    await c.create()
    objs = c.objects(30)
    assert all(r.ok for r in await c.coord.upsert("Rep", objs))
    q = np.ones((1, DIM), dtype=np.float32)
    full = await c.coord.query(QueryRequest("Rep", near_vector=q, limit=30))
    assert len(full.objects) == 30
    for dead in (0, 1):  # either replica of every shard may die
        for s in range(2):
            c.client(s, dead).down = True
            c.client(s, 1 - dead).down = False
        for _ in range(4):  # round-robin reaches the dead replica; failover hides it
            res = await c.coord.query(QueryRequest("Rep", near_vector=q, limit=30))
            assert [o.uuid for o in res.objects] == [o.uuid for o in full.objects]
            assert res.missing_shards == ()
            got = await c.coord.get_object("Rep", objs[5].uuid or "", False)
            assert got.properties == {"n": 5}
            assert len(await c.coord.list_objects("Rep", None, 100, False)) == 30
            desc = await c.coord.describe_collection("Rep")
            assert sum(s["stats"].n_objects for s in desc["shards"]) == 30
    # Reads never marked anything stale: a failed read is not a missed write.
    assert all(r.state == READY for s in range(2) for r in c.replicas(s).replicas)


@pytest.mark.anyio
async def test_failover_order_prefers_replicas_that_did_not_fail(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=3, shards=1)
    await c.create()
    rs = c.replicas(0)
    orders = {tuple(r.index for r in rs.read_order()) for _ in range(6)}
    assert {o[0] for o in orders} == {0, 1, 2}  # round-robin over healthy replicas
    c.client(0, 1).down = True
    await rs.read(lambda cl, t: cl.list_objects(None, 1, False, t), 1.0)
    await rs.read(lambda cl, t: cl.list_objects(None, 1, False, t), 1.0)
    await rs.read(lambda cl, t: cl.list_objects(None, 1, False, t), 1.0)
    # replica 1 failed a read: it now comes last, after the healthy ones
    for _ in range(3):
        assert [r.index for r in rs.read_order()][-1] == 1
    c.client(0, 1).down = False
    rs.replicas[1].state = STALE
    assert all(r.index != 1 for r in rs.read_order())  # stale replicas serve no reads
    # every replica down: the read fails naming the shard, after retrying while time allows
    for r in (0, 1, 2):
        c.client(0, r).down = True
    with pytest.raises(Unavailable, match="shard Rep:0 is unavailable"):
        await rs.read(lambda cl, t: cl.list_objects(None, 1, False, t), 0.5)


@pytest.mark.anyio
async def test_catch_up_copies_updates_and_propagates_deletes(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=2, shards=2)
    await c.create()
    objs = c.objects(40)
    assert all(r.ok for r in await c.coord.upsert("Rep", objs))
    for s in range(2):
        c.client(s, 1).down = True  # replica 1 of every shard goes away
    # While it is away: new objects, replaced objects, single deletes, a delete by filter.
    fresh = c.objects(15, base=1000)
    assert all(r.ok for r in await c.coord.upsert("Rep", fresh, consistency_level="one"))
    replaced = [
        ObjectInput(o.uuid, {"n": -1}, {"v": np.ones((2, DIM), np.float32)}) for o in objs[:5]
    ]
    assert all(r.ok for r in await c.coord.upsert("Rep", replaced, consistency_level="one"))
    for o in objs[5:10]:
        assert await c.coord.delete_object("Rep", o.uuid or "", consistency_level="one")
    out = await c.coord.delete_where(
        "Rep",
        {"path": "n", "operator": "greater_than_equal", "value": 1010},
        consistency_level="one",
    )
    assert out["deleted"] == 5
    assert {r.state for s in range(2) for r in c.replicas(s).replicas[1:]} == {STALE}
    # Still down: a repair round cannot catch it up, it stays stale and serves no reads.
    assert await c.coord.repair_once() == {}
    before = {s: c.client(s, 1).reads for s in range(2)}
    for _ in range(3):
        await c.coord.list_objects("Rep", None, 1000, False)
    assert {s: c.client(s, 1).reads for s in range(2)} == before
    # Back: the next round syncs it from replica 0 and marks it ready.
    for s in range(2):
        c.client(s, 1).down = False
    caught = await c.coord.repair_once()
    assert set(caught) == {"Rep:0:1", "Rep:1:1"}
    # objs[5:10] were deleted while it was away (the filter-deleted ones never reached it)
    assert sum(v["deleted"] for v in caught.values()) == 5
    for s in range(2):
        assert [r.state for r in c.replicas(s).replicas] == [READY, READY]
        assert c.listing(s, 1) == c.listing(s, 0)
    assert c.store.placements["Rep"][(0, 1)]["state"] == READY
    total = {u for s in range(2) for u in c.listing(s, 1)}
    expected = {o.uuid for o in objs} - {o.uuid for o in objs[5:10]} | {o.uuid for o in fresh[:10]}
    assert total == expected
    assert await c.coord.repair_once() == {}  # nothing left to do


def lose_data(c: Cluster, root: Path, shard: int, replica: int) -> None:
    """What ShardActor does when Ray restarts it on a node without its data: an empty engine,
    refusing everything (DataLost) until cleared."""
    client = c.client(shard, replica)
    client.engine.close()
    client.engine = ShardEngine(
        c.coord.spec("Rep"), shard, root / f"elsewhere-{shard}", ShardSettings(fsync=False)
    )
    client.lost = f"shard Rep:{shard} was restarted on node n2 with an empty data directory"


@pytest.mark.anyio
async def test_a_replica_restarted_without_its_data_fails_over_and_is_refilled(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path, rf=2, shards=1)
    await c.create()
    objs = c.objects(30)
    assert all(r.ok for r in await c.coord.upsert("Rep", objs))
    lose_data(c, tmp_path, 0, 1)
    assert (await c.coord.readiness())["ready"]  # replica 0 serves the shard
    q = np.ones((1, DIM), dtype=np.float32)
    for _ in range(3):  # whichever replica the round-robin picks: all 30, never an empty shard
        res = await c.coord.query(QueryRequest("Rep", near_vector=q, limit=50))
        assert len(res.objects) == 30 and res.missing_shards == ()
    assert [r.state for r in c.replicas(0).replicas] == [READY, STALE]
    # The repair round clears the flag and refills it from replica 0; then it serves again.
    caught = await c.coord.repair_once()
    assert caught["Rep:0:1"]["copied"] == 30
    assert c.client(0, 1).lost is None
    assert [r.state for r in c.replicas(0).replicas] == [READY, READY]
    assert c.listing(0, 1) == c.listing(0, 0)
    c.client(0, 0).down = True
    res = await c.coord.query(QueryRequest("Rep", near_vector=q, limit=50))
    assert len(res.objects) == 30


@pytest.mark.anyio
async def test_a_write_marks_a_replica_without_its_data_stale(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=3, shards=1)
    await c.create()
    lose_data(c, tmp_path, 0, 2)
    assert all(r.ok for r in await c.coord.upsert("Rep", c.objects(5)))  # quorum: 2 of 3
    await asyncio.sleep(0.05)  # the refusing replica settles after the acknowledgement
    assert [r.state for r in c.replicas(0).replicas] == [READY, READY, STALE]


@pytest.mark.anyio
async def test_a_single_replica_without_its_data_answers_data_lost_at_once(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=1, shards=1, query_timeout_s=20.0)
    await c.create()
    assert all(r.ok for r in await c.coord.upsert("Rep", c.objects(5)))
    lose_data(c, tmp_path, 0, 0)
    q = np.ones((1, DIM), dtype=np.float32)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(DataLost, match="restarted on node n2 with an empty data directory"):
        await c.coord.query(QueryRequest("Rep", near_vector=q, limit=5))
    assert loop.time() - start < 1.0  # no retrying until the deadline: the data is elsewhere
    [result] = await c.coord.upsert("Rep", c.objects(1))
    assert not result.ok and (result.error or {}).get("code") == "shard_data_lost"
    assert [r.state for r in c.replicas(0).replicas] == [READY]  # nothing to catch up from
    assert await c.coord.repair_once() == {}
    assert await c.coord.readiness() == {
        "ready": False,
        "etcd": True,
        "unavailable_shards": ["Rep:0"],
    }


@pytest.mark.anyio
async def test_sync_replica_is_exact_and_idempotent(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=2, shards=1)
    await c.create()
    await c.coord.upsert("Rep", c.objects(600))  # more than one sync page
    a, b = c.client(0, 0), c.client(0, 1)
    b.engine.delete([o.uuid for o in b.engine.list_objects(None, 50)])
    extra = c.objects(7, base=5000)
    from cluster.validation import prepare_batch

    b.engine.upsert(prepare_batch(c.coord.spec("Rep"), extra))
    stats = await sync_replica(a, b, 10.0, page=128)
    assert stats == {"compared": 600, "copied": 50, "deleted": 7}
    assert c.listing(0, 1) == c.listing(0, 0)
    assert await sync_replica(a, b, 10.0, page=128) == {"compared": 600, "copied": 0, "deleted": 0}


@pytest.mark.anyio
async def test_all_replicas_stale_promotes_the_latest_writer(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=2, shards=1)
    await c.create()
    first = c.objects(5)
    c.client(0, 1).down = True
    await c.coord.upsert("Rep", first, consistency_level="one")  # 1 goes stale
    c.client(0, 0).down = True
    with pytest.raises(Unavailable):
        await c.coord.upsert("Rep", c.objects(2, base=50), consistency_level="one")
    # replica 0 is ready, only down; a write failing on it would mark it stale:
    rs = c.replicas(0)
    rs.replicas[0].state = STALE
    for r in (0, 1):
        c.client(0, r).down = False
    await c.coord.repair_once()
    assert [r.state for r in rs.replicas] == [READY, READY]
    assert set(c.listing(0, 1)) == {o.uuid for o in first}  # 0 had the later write


@pytest.mark.anyio
async def test_query_deadline_names_the_slow_shard_or_gives_partial(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=1, shards=3, query_timeout_s=5.0)
    await c.create()
    await c.coord.upsert("Rep", c.objects(30))
    q = np.ones((1, DIM), dtype=np.float32)
    c.client(1, 0).delay = 3.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(DeadlineExceeded, match="Rep:1") as err:
        await c.coord.query(QueryRequest("Rep", near_vector=q, limit=30, timeout_s=0.3))
    assert loop.time() - start < 2.0
    assert err.value.details["shard"] == "Rep:1"
    res = await c.coord.query(
        QueryRequest("Rep", near_vector=q, limit=30, timeout_s=0.3, partial=True)
    )
    assert res.missing_shards == (1,)
    n1 = sum(1 for o in res.objects if shard_for_uuid(o.uuid, 3) == 1)
    assert n1 == 0 and len(res.objects) > 0
    with pytest.raises(InvalidInput, match="timeout"):
        await c.coord.query(QueryRequest("Rep", near_vector=q, timeout_s=10_000.0))
    # RF=2: a slow replica costs its share of the deadline, then the other one answers.
    c2 = Cluster(tmp_path / "rf2", rf=2, shards=1)
    await c2.create()
    await c2.coord.upsert("Rep", c2.objects(10))
    c2.client(0, 0).delay = c2.client(0, 1).delay = 0.0
    c2.client(0, 1).delay = 5.0
    for _ in range(3):
        res = await c2.coord.query(QueryRequest("Rep", near_vector=q, limit=10, timeout_s=2.0))
        assert len(res.objects) == 10


@pytest.mark.anyio
async def test_quorum_ack_does_not_wait_for_a_slow_replica(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=3, shards=1)
    await c.create()
    c.client(0, 2).write_delay = 1.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    res = await c.coord.upsert("Rep", c.objects(3))
    assert all(r.ok for r in res) and loop.time() - start < 0.9
    # The next write to the shard waits for the straggler (same order on every replica).
    c.client(0, 2).write_delay = 0.0
    await c.coord.upsert("Rep", c.objects(3, base=10))
    assert loop.time() - start >= 0.9
    assert len(c.listing(0, 2)) == 6
    assert all(r.state == READY for r in c.replicas(0).replicas)


class FlakyStore(MemoryStore):
    """A MemoryStore whose placement writes fail while ``down`` (etcd unreachable)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def put_placement(self, collection: str, shard: int, replica: int, info: Any) -> None:
        if self.down:
            raise Unavailable("etcd at 127.0.0.1:1 unreachable during put_placement")
        await super().put_placement(collection, shard, replica, info)


@pytest.mark.anyio
async def test_placement_state_is_rewritten_once_the_store_is_back(tmp_path: Path) -> None:
    c = Cluster(tmp_path, rf=2, shards=1)
    c.store = FlakyStore()
    c.coord = Coordinator(c.store, c.placement, c.coord._settings)
    await c.create()
    c.store.down = True
    c.client(0, 1).down = True
    # the write is not held up by the store: acknowledged by replica 0 (consistency one)
    assert all(r.ok for r in await c.coord.upsert("Rep", c.objects(5), consistency_level="one"))
    assert await c.coord.flush_placements() == 1  # still pending
    assert c.store.placements["Rep"][(0, 1)]["state"] == READY  # etcd has not seen it
    c.client(0, 1).down = False
    await c.coord.repair_once()  # caught up in memory; etcd still down
    assert c.replicas(0).replicas[1].state == READY
    c.store.down = False
    await c.coord.repair_once()
    assert c.store.placements["Rep"][(0, 1)]["state"] == READY
    assert c.coord.router.pending == frozenset()
    c.client(0, 1).down = True
    await c.coord.upsert("Rep", c.objects(2, base=50), consistency_level="one")
    await c.coord.repair_once()
    assert c.store.placements["Rep"][(0, 1)]["state"] == STALE
