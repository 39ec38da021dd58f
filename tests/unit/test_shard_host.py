"""Shard hosts (``shard.host``) outside Ray, their shared background pools
(``shard.background``) and placement's node choice (``coordinator.placement.choose_node``)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.errors import InvalidInput, ShardNotOpen
from cluster.types import VectorSearch
from coordinator.placement import Placed, choose_node, host_name, node_room
from shard.background import BackgroundPool
from shard.host import ShardHost, private_memory_bytes
from tests.unit.test_shard_support import batch, make_spec, random_docs, settings, uid

IDLE_SHARD_BUDGET_BYTES = 20 * 2**20


def _open(host: ShardHost, root: Path, i: int, existed: bool = False) -> dict[str, object]:
    spec = make_spec()
    return host.open(
        f"colshard:Docs:{i}", spec.to_json(), i, str(root), settings(), f"Docs/{i}", existed
    )


# ---- the background pool -----------------------------------------------------------------


def test_pool_runs_due_steps_backs_off_when_idle_and_wakes() -> None:
    runs: dict[str, list[float]] = {"busy": [], "idle": []}
    work = [3]  # the busy step has three units of work, then none

    def busy() -> float | None:
        runs["busy"].append(time.monotonic())
        if work[0] > 0:
            work[0] -= 1
            return 0.0
        return None

    def idle() -> float | None:
        runs["idle"].append(time.monotonic())
        return None

    pool = BackgroundPool("t", 2, idle_min_s=0.05, idle_max_s=0.4)
    try:
        pool.add("busy", busy)
        pool.add("idle", idle)
        with pytest.raises(ValueError):
            pool.add("idle", idle)
        time.sleep(1.5)
        assert len(runs["busy"]) >= 4  # the three units back to back, then idle rounds
        gaps = np.diff(runs["idle"])
        assert gaps[0] < 0.2 and gaps[-1] >= 0.3  # idle: waits longer each round, capped
        assert len(runs["idle"]) < 12
        before = len(runs["idle"])
        woken = time.monotonic()
        pool.wake("idle")
        time.sleep(0.1)
        assert len(runs["idle"]) > before
        assert runs["idle"][before] - woken < 0.05  # at once, not after the 0.4 s wait
        pool.remove("idle")
        n = len(runs["idle"])
        time.sleep(0.6)
        assert len(runs["idle"]) == n and len(pool) == 1
    finally:
        pool.close()


def test_pool_remove_waits_for_the_running_step() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def slow() -> float | None:
        started.set()
        release.wait(5)
        finished.append(True)
        return None

    pool = BackgroundPool("t", 1)
    try:
        pool.add("slow", slow)
        assert started.wait(5)
        threading.Timer(0.3, release.set).start()
        pool.remove("slow")
        assert finished == [True]  # remove returned only after the step ended
    finally:
        pool.close()


# ---- the host ------------------------------------------------------------------------------


def test_host_serves_many_shards_and_an_idle_shard_costs_little(tmp_path: Path) -> None:
    host = ShardHost("colshard:host:test", str(tmp_path), restarted=False)
    try:
        rng = np.random.default_rng(0)
        _open(host, tmp_path, 0)
        host.call("colshard:Docs:0", "upsert", (batch([1, 2], {"v": random_docs(rng, 2, 8)}),))
        q = VectorSearch(target_vector="v", query=rng.normal(size=(2, 8)).astype("f4"), k=2)
        assert len(host.call("colshard:Docs:0", "search", (q,)).hits) == 2
        gc.collect()
        before = private_memory_bytes()
        threads = threading.active_count()
        n = 150
        for i in range(1, n + 1):
            _open(host, tmp_path, i)
        time.sleep(1.0)
        gc.collect()
        per_shard = (private_memory_bytes() - before) / n
        assert 0 < per_shard <= IDLE_SHARD_BUDGET_BYTES, per_shard
        # Threads do not grow with the shards: they share the pools, gauges and fast path.
        assert threading.active_count() - threads <= 1
        info = host.info()
        assert len(info["shards"]) == n + 1 and info["pid"] > 0
        with pytest.raises(ShardNotOpen):
            host.call("colshard:Other:0", "stats")
        with pytest.raises(InvalidInput):
            host.call("colshard:Docs:0", "__init__")
        ready = _open(host, tmp_path, 0)  # open again: the same shard, nothing reopened
        assert ready["objects"] == 2 and ready["key"] == "colshard:Docs:0"
    finally:
        host.shutdown()


def test_restarted_host_reopens_what_it_held_and_a_fresh_one_forgets(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    host = ShardHost("colshard:host:test", str(tmp_path), restarted=False)
    for i in range(3):
        _open(host, tmp_path, i)
        host.call(f"colshard:Docs:{i}", "upsert", (batch([i], {"v": random_docs(rng, 1, 8)}),))
    host.call("colshard:Docs:2", "drop")  # dropped: not listed any more
    assert not (tmp_path / "Docs" / "2").exists()
    host.shutdown()  # like a crash for the list: it stays

    again = ShardHost("colshard:host:test", str(tmp_path), restarted=True)
    try:
        # a call for a listed shard opens it at once (the reopen thread may not be there yet)
        assert host_ok(again, "colshard:Docs:1", uid(1))
        deadline = time.monotonic() + 10
        while len(again.info()["shards"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert again.info()["shards"] == ["colshard:Docs:0", "colshard:Docs:1"]
        with pytest.raises(ShardNotOpen):
            again.call("colshard:Docs:2", "stats")
    finally:
        again.shutdown()

    fresh = ShardHost("colshard:host:test", str(tmp_path), restarted=False)
    try:
        with pytest.raises(ShardNotOpen):  # a new host holds only what it is asked to open
            fresh.call("colshard:Docs:0", "stats")
        assert _open(fresh, tmp_path, 0, existed=True)["objects"] == 1  # from its data dir
    finally:
        fresh.shutdown()


def host_ok(host: ShardHost, key: str, oid: str) -> bool:
    return host.call(key, "get", (oid, False)) is not None


def test_a_shard_reopened_over_an_empty_directory_is_a_loss(tmp_path: Path) -> None:
    host = ShardHost("colshard:host:test", str(tmp_path), restarted=False)
    try:
        info = _open(host, tmp_path, 7, existed=True)  # it existed, but nothing is here
        assert info["data_lost"] and "empty data directory" in str(info["data_lost"])
    finally:
        host.shutdown()


# ---- placement -----------------------------------------------------------------------------


def test_node_room() -> None:
    assert node_room({"CPU": 2}, {}) is None
    assert node_room({"colshard_shard": 3.0}, {"colshard_shard": 1.0}) == 3
    assert node_room({"colshard_shard": 1.0, "x": 1}, {"colshard_shard": 0.5, "x": 1}) == 1
    assert node_room({"CPU": 2}, {"colshard_shard": 1.0}) == 0


def test_choose_node_spreads_replicas_and_keeps_where_they_are() -> None:
    nodes: dict[str, int | None] = {"a": None, "b": None, "c": None}
    placed: dict[str, Placed] = {}

    def place(key: str, group: str, collection: str, hint: str = "") -> str | None:
        node = choose_node(key, group, collection, nodes, placed, hint)
        if node is not None:
            placed[key] = Placed(node, group, collection)
        return node

    # replicas of one shard on different nodes; a collection's shards spread
    assert {place("X:0:0", "X:0", "X"), place("X:0:1", "X:0", "X")} == {"a", "b"}
    assert place("X:1:0", "X:1", "X") == "c"
    assert place("X:1:1", "X:1", "X") in {"a", "b"}
    assert place("X:0:0", "X:0", "X") == placed["X:0:0"].node_id  # stays while alive
    # the node recorded for it (hint), else the least loaded
    assert place("Y:0", "Y:0", "Y", hint="c") == "c"
    # room: a node at its cap takes no more; none anywhere: None
    nodes = {"a": 1, "b": 1}
    placed.clear()
    assert place("Z:0", "Z:0", "Z") == "a" and place("Z:1", "Z:1", "Z") == "b"
    assert place("Z:2", "Z:2", "Z") is None
    del nodes["b"]  # b died: its replica finds no room on a
    del placed["Z:1"]
    assert place("Z:1", "Z:1", "Z") is None


def test_host_names() -> None:
    assert host_name("0123456789abcdef") == "colshard:host:01234567"
    assert host_name("0123456789abcdef", 1) == "colshard:host:01234567:r1"
    assert host_name("0123456789abcdef", 0, 1) == "colshard:host:01234567:1"
    assert host_name("0123456789abcdef", 2, 1) == "colshard:host:01234567:1:r2"


def test_placement_refuses_moves_without_room_and_drains_around_cordons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.placement import RayPlacement
    from tests.unit.test_shard_support import make_spec as spec_of

    placement = RayPlacement("ns", tmp_path, settings(), {"colshard_shard": 1.0})
    monkeypatch.setattr(placement, "alive_shard_nodes", lambda: {"a": 2, "b": 1, "c": 1})
    spec = spec_of()
    placement.moved(spec, 0, 0, "a")
    placement.moved(spec, 1, 0, "b")
    assert placement.refusal(spec, 0, 0, "x") is not None  # not an alive shard node
    assert "no room" in str(placement.refusal(spec, 0, 0, "b"))  # b holds 1 of 1
    assert placement.refusal(spec, 0, 0, "c") is None
    assert placement.refusal(spec, 1, 0, "b") is None  # its own place does not count
    # leaving a: c (b is full); with c cordoned: nowhere
    assert placement.choose_target(spec, 0, 0, leaving="a") == "c"
    assert placement.cordon("c") == {"c"}
    assert placement.choose_target(spec, 0, 0, leaving="a") is None
    assert placement.cordon("c", on=False) == frozenset()
