"""The routing table and its one writer (coordinator.routing): snapshots are immutable and
versioned, a reader's snapshot does not move under it, and only changed records reach etcd."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from cluster.errors import NotFound, Unavailable
from cluster.ids import ShardId
from cluster.spec import CollectionSpec
from coordinator.replication import ReplicaSet
from coordinator.routing import (
    ReplicaEntry,
    ReplicaId,
    ReplicaState,
    Router,
    outage_ended,
    outage_started,
)

pytestmark = pytest.mark.anyio


class Store:
    def __init__(self) -> None:
        self.records: dict[tuple[str, int, int], dict[str, Any]] = {}
        self.collections = {"C"}
        self.down = False
        self.writes = 0

    async def put_placement(
        self, collection: str, shard: int, replica: int, info: Mapping[str, Any]
    ) -> None:
        if self.down:
            raise Unavailable("etcd unreachable")
        if collection not in self.collections:
            raise NotFound(collection)
        self.writes += 1
        self.records[(collection, shard, replica)] = dict(info)


class Client:
    def __init__(self, shard: int) -> None:
        self.shard_id = ShardId("C", shard)


def spec(shards: int = 2, rf: int = 2) -> CollectionSpec:
    return CollectionSpec.from_dict(
        {
            "name": "C",
            "shard_count": shards,
            "replication_factor": rf,
            "vectors": [{"name": "v", "dim": 4}],
        }
    )


def open_collection(router: Router, shards: int = 2, rf: int = 2) -> None:
    clients = [[Client(s) for _ in range(rf)] for s in range(shards)]
    entries = [
        ReplicaEntry(ReplicaId("C", s, r), c, node_id="n1")
        for s, reps in enumerate(clients)
        for r, c in enumerate(reps)
    ]
    router.add_collection(
        spec(shards, rf),
        entries,
        [ReplicaSet.over(router, [e for e in entries if e.id.shard == s]) for s in range(shards)],
    )


async def test_each_change_is_a_new_immutable_version() -> None:
    store = Store()
    router = Router(store)
    before = router.table
    open_collection(router)
    table = router.table
    assert table.version == before.version + 1 and before.spec("C") is None
    assert table.spec("C") is not None and len(table.shard_sets("C")) == 2
    with pytest.raises(TypeError):
        table.replicas[ReplicaId("C", 0, 0)] = None  # type: ignore[index]
    rid = ReplicaId("C", 1, 1)
    table.shard_sets("C")[1].set_state(table.shard_sets("C")[1].replicas[1], "stale")
    after = router.table
    assert after.version == table.version + 1
    assert table.replicas[rid].sync is ReplicaState.READY  # the reader's snapshot held still
    assert after.replicas[rid].sync is ReplicaState.STALE
    assert not router.update(rid, sync=ReplicaState.STALE)  # no change, no new version
    assert router.table is after


async def test_records_reach_etcd_once_and_wait_out_an_outage() -> None:
    store = Store()
    router = Router(store)
    open_collection(router)
    assert await router.flush(raise_errors=True) == 0 and store.writes == 4
    rid = ReplicaId("C", 0, 1)
    table = router.table
    router.applied(rid, 7)  # after each write: not written alone, no new snapshot
    assert router.pending == frozenset() and await router.flush() == 0 and store.writes == 4
    assert router.table is table and router.last_ok_seq(rid) == 7
    store.down = True
    assert outage_started(router, rid) and not outage_started(router, rid)
    assert router.table.unavailable_shards() == []  # its peer still serves shard 0
    assert outage_started(router, ReplicaId("C", 0, 0))
    assert router.table.unavailable_shards() == ["C:0"]
    assert await router.flush() == 2  # etcd down: kept
    with pytest.raises(Unavailable):
        await router.flush(raise_errors=True)
    store.down = False
    assert await router.flush() == 0
    record = store.records[("C", 0, 1)]
    assert record["state"] == "unavailable" and record["previous_state"] == "ready"
    assert record["last_ok_seq"] == 7 and "n1" in record["reason"]
    assert outage_ended(router, rid, {"node_id": "n2", "host": "h2", "pid": 9})
    await router.flush()
    record = store.records[("C", 0, 1)]
    assert (record["state"], record["node_id"], record["pid"]) == ("ready", "n2", 9)
    assert "reason" not in record and "previous_state" not in record


async def test_a_dropped_collection_leaves_the_table_and_its_pending_records() -> None:
    store = Store()
    router = Router(store)
    open_collection(router)
    rs = router.table.shard_sets("C")[0]
    store.down = True
    router.drop_collection("C")
    assert router.table.spec("C") is None and router.pending == frozenset()
    assert rs.replicas[0].state == "ready"  # an in-flight request still sees its last entry
    assert not router.update(ReplicaId("C", 0, 0), sync=ReplicaState.STALE)
    store.down = False
    store.collections.clear()
    open_collection(router)
    assert await router.flush() == 0  # NotFound (dropped in etcd meanwhile): not retried


def test_a_replica_set_alone_keeps_its_own_table() -> None:
    rs = ReplicaSet.of("C", 0, [Client(0), Client(0)])
    rs.set_state(rs.replicas[1], "stale")
    assert [r.state for r in rs.replicas] == ["ready", "stale"] and len(rs.ready()) == 1
