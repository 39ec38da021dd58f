"""Replication and fault tolerance against real Ray actors, a real etcd and real HTTP.

- RF=2: one replica's worker is SIGKILLed (twice) during concurrent queries and imports: no
  query fails, no acknowledged write is lost, and afterwards both replicas hold the same
  objects byte for byte.
- RF=2: a replica killed for good (no restart) misses writes: consistency ``one`` is still
  acknowledged, ``quorum``/``all`` fail with 503 naming the shard; the coordinator recreates the
  actor, catches it up (updates and deletes) and it equals the other replica again.
- A slow shard (the actor's ``set_delay`` fault-injection hook): the query's deadline gives 504
  naming the shard, or partial results with ``allow_partial``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

from cluster.errors import DeadlineExceeded
from gateway.client import Client
from tests.integration.conftest import Server
from tests.integration.shards import ShardRef

pytestmark = pytest.mark.integration
DIM = 8


def _create(http: httpx.Client, name: str, shards: int, rf: int) -> None:
    r = http.post(
        "/v1/collections",
        json={
            "name": name,
            "properties": [{"name": "k", "data_type": "int"}],
            "vectors": [{"name": "v", "dim": DIM, "metric": "dot"}],
            "shard_count": shards,
            "replication_factor": rf,
        },
    )
    assert r.status_code == 201, r.text


def _objects(rng: np.random.Generator, n: int, base: int) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "properties": {"k": base + i},
            "vectors": {"v": rng.normal(size=(int(rng.integers(1, 4)), DIM)).tolist()},
        }
        for i in range(n)
    ]


def _replica_listing(server: Server, actor_name: str) -> dict[str, tuple[Any, bytes]]:
    """Every object of one replica, read from its actor directly (not through failover)."""

    shard = ShardRef(server, actor_name)
    out: dict[str, tuple[Any, bytes]] = {}
    after = None
    while True:
        page = shard.call("list_objects", after, 1000, True)
        for o in page:
            out[o.uuid] = (
                dict(o.properties),
                np.asarray(o.vectors["v"], dtype=np.float32).tobytes(),
            )
        if len(page) < 1000:
            return out
        after = page[-1].uuid


def _wait_ready(http: httpx.Client, name: str, timeout_s: float = 90.0) -> dict[str, Any]:
    deadline = time.time() + timeout_s
    while True:
        info: dict[str, Any] = http.get(f"/v1/collections/{name}").json()
        states = [s for sh in info["shards"] for s in sh["replica_states"]]
        if all(s == "ready" for s in states) and not any(sh["error"] for sh in info["shards"]):
            return info
        if time.time() > deadline:
            raise AssertionError(f"replicas not ready: {info['shards']}")
        time.sleep(0.5)


def test_rf2_sigkill_one_replica_under_load(colshard_server: Server) -> None:

    rng = np.random.default_rng(21)
    stop = threading.Event()
    acked: dict[str, np.ndarray] = {}
    write_errors: list[str] = []
    query_failures: list[str] = []
    n_queries = [0]
    with httpx.Client(base_url=colshard_server.url, timeout=120) as http:
        _create(http, "RepKill", shards=1, rf=2)
        seed = _objects(rng, 50, 0)
        assert (
            http.post("/v1/collections/RepKill/objects", json={"objects": seed}).json()["n_ok"]
            == 50
        )
        for o in seed:
            acked[o["id"]] = np.asarray(o["vectors"]["v"], dtype=np.float32)

        def importer() -> None:
            local = np.random.default_rng(5)
            with httpx.Client(base_url=colshard_server.url, timeout=120) as c:
                k = 1000
                while not stop.is_set():
                    batch = _objects(local, 20, k)
                    k += 20
                    try:
                        r = c.post("/v1/collections/RepKill/objects", json={"objects": batch})
                    except httpx.HTTPError as exc:
                        write_errors.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        write_errors.append(r.text)
                        continue
                    for obj, row in zip(batch, r.json()["results"], strict=True):
                        if row["status"] == "SUCCESS":
                            acked[obj["id"]] = np.asarray(obj["vectors"]["v"], np.float32)

        def querier() -> None:
            local = np.random.default_rng(6)
            with httpx.Client(base_url=colshard_server.url, timeout=120) as c:
                while not stop.is_set():
                    q = local.normal(size=(2, DIM)).tolist()
                    try:
                        r = c.post(
                            "/v1/collections/RepKill/query",
                            json={"near_vector": {"vector": q}, "limit": 5},
                        )
                        ok = r.status_code == 200 and len(r.json()["objects"]) == 5
                        if not ok:
                            query_failures.append(f"{r.status_code} {r.text[:300]}")
                        some = next(iter(list(acked)))
                        r = c.get(f"/v1/collections/RepKill/objects/{some}")
                        if r.status_code != 200:
                            query_failures.append(f"get {r.status_code} {r.text[:300]}")
                    except httpx.HTTPError as exc:
                        query_failures.append(repr(exc))
                    n_queries[0] += 1

        threads = [
            threading.Thread(target=importer),
            threading.Thread(target=querier),
            threading.Thread(target=querier),
        ]
        for t in threads:
            t.start()
        # Replica r of every shard on this one node lives in the node's host for replica r
        # (coordinator.placement): killing one host takes one replica of the shard.
        replicas = [ShardRef(colshard_server, f"colshard:RepKill:0:{r}") for r in (0, 1)]
        assert replicas[0].pid() != replicas[1].pid()
        try:
            # Three kill points, one replica at a time (replica 0, the old read target, too);
            # ready() on both first: the previous victim is back before the next kill.
            for victim in (1, 0, 1):
                time.sleep(2.0)
                pids = [r.call("ready", timeout_s=120)["pid"] for r in replicas]
                os.kill(pids[victim], signal.SIGKILL)
            time.sleep(3.0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=180)

        assert n_queries[0] > 20, n_queries
        assert not query_failures, (len(query_failures), query_failures[:3])
        assert len(acked) > 150, (len(acked), write_errors[:3])
        _wait_ready(http, "RepKill")
        r0 = _replica_listing(colshard_server, "colshard:RepKill:0:0")
        r1 = _replica_listing(colshard_server, "colshard:RepKill:0:1")
        missing = set(acked) - set(r0)
        assert not missing, f"{len(missing)} acknowledged objects lost on replica 0"
        assert r1 == r0  # the restarted replica equals the other one
        for oid, vec in acked.items():
            assert r0[oid][1] == vec.tobytes()
        assert http.delete("/v1/collections/RepKill").status_code == 200


def test_rf2_replica_down_for_good_is_recreated_and_caught_up(colshard_server: Server) -> None:

    rng = np.random.default_rng(22)
    url = "/v1/collections/RepDown/objects"
    with httpx.Client(base_url=colshard_server.url, timeout=120) as http:
        _create(http, "RepDown", shards=1, rf=2)
        first = _objects(rng, 40, 0)
        assert http.post(url, json={"objects": first}).json()["n_ok"] == 40
        down = ShardRef(colshard_server, "colshard:RepDown:0:1")
        old_pid = down.pid()
        down.kill(no_restart=True)
        # consistency one: acknowledged by replica 0 at least. The dead host is recreated by
        # the next call to the replica (its client asks placement again), which reopens it
        # from the data it left; a write it missed meanwhile makes it stale until the repair
        # loop catches it up.
        second = _objects(rng, 10, 100)
        with Client(colshard_server.url) as client:  # the SDK sends ?consistency_level=one
            result = (
                client.collections.get("RepDown")
                .with_consistency_level("one")
                .data.insert_many(second)
            )
        assert result.n_ok == 10 and result.n_failed == 0, result.errors
        # quorum (2 of 2) and all cannot be met while it is stale: 503 naming the shard,
        # at once (nothing is sent). The replica may already be back and caught up, so
        # accept success too but never a silent partial write.
        for level in ("quorum", "all"):
            r = http.post(
                url, params={"consistency_level": level}, json={"objects": _objects(rng, 2, 900)}
            )
            if r.status_code == 503:
                err = r.json()["error"]
                assert err["code"] == "unavailable" and "RepDown:0" in err["message"]
            else:
                assert r.status_code == 200 and r.json()["n_ok"] == 2, r.text
        # deletes and updates while it is away (consistency one)
        for o in first[:5]:
            r = http.delete(f"{url}/{o['id']}", params={"consistency_level": "one"})
            assert r.status_code in (200, 503), r.text
        changed = {**first[5], "properties": {"k": -5}}
        r = http.put(
            f"{url}/{changed['id']}",
            params={"consistency_level": "one"},
            json={"properties": changed["properties"], "vectors": changed["vectors"]},
        )
        assert r.status_code == 200, r.text
        # Back in a new host process, caught up and ready.
        _wait_ready(http, "RepDown", timeout_s=120)
        r0 = _replica_listing(colshard_server, "colshard:RepDown:0:0")
        r1 = _replica_listing(colshard_server, "colshard:RepDown:0:1")
        assert r1 == r0
        assert ShardRef(colshard_server, "colshard:RepDown:0:1").pid() != old_pid
        assert not {o["id"] for o in first[:5]} & set(r1)
        assert r1[changed["id"]][0] == {"k": -5}
        assert {o["id"] for o in second} <= set(r1)
        placements = http.get("/v1/cluster").json()["collections"]["RepDown"]["placements"]
        assert {p["state"] for p in placements} == {"ready"}
        assert http.delete("/v1/collections/RepDown").status_code == 200


def test_slow_shard_deadline_504_or_partial(colshard_server: Server) -> None:

    rng = np.random.default_rng(23)
    with httpx.Client(base_url=colshard_server.url, timeout=120) as http:
        _create(http, "Slow", shards=2, rf=1)
        objs = _objects(rng, 40, 0)
        assert (
            http.post("/v1/collections/Slow/objects", json={"objects": objs}).json()["n_ok"] == 40
        )
        slow = ShardRef(colshard_server, "colshard:Slow:1")
        slow.call("set_delay", 4.0)
        q = {"near_vector": {"vector": [[1.0] * DIM]}, "limit": 40}
        try:
            start = time.time()
            r = http.post("/v1/collections/Slow/query", json={**q, "timeout": 1.0})
            took = time.time() - start
            assert r.status_code == 504, r.text
            err = r.json()["error"]
            assert err["code"] == "deadline_exceeded" and "Slow:1" in err["message"]
            assert took < 3.5, took
            r = http.post(
                "/v1/collections/Slow/query", json={**q, "timeout": 1.0, "allow_partial": True}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["partial"] is True and body["missing_shards"] == [1]
            assert 0 < len(body["objects"]) < 40
            r = http.post("/v1/collections/Slow/query", json={**q, "timeout": 100_000})
            assert r.status_code == 422, r.text
            # The SDK: the same deadline and partial results through with_query_options.
            with Client(colshard_server.url) as client:
                slow_col = client.collections.get("Slow")
                with pytest.raises(DeadlineExceeded, match="Slow:1"):
                    slow_col.with_query_options(timeout=1.0).query.near_vector(
                        q["near_vector"]["vector"], limit=40
                    )
                part = slow_col.with_query_options(
                    timeout=1.0, allow_partial=True
                ).query.near_vector(q["near_vector"]["vector"], limit=40)
                assert part.partial and part.missing_shards == [1]
                assert 0 < len(part.objects) < 40
        finally:
            slow.call("set_delay", 0.0)
        time.sleep(4.0)  # let the delayed calls drain
        r = http.post("/v1/collections/Slow/query", json=q)
        assert r.status_code == 200 and r.json()["partial"] is False
        assert len(r.json()["objects"]) == 40
        assert http.delete("/v1/collections/Slow").status_code == 200


def _restart_without_data(server: Server, actor_name: str) -> str:
    """Freeze the replica's host, delete the replica's data directory, SIGKILL the host: Ray
    restarts it on this node and it reopens the replica over an empty directory, as on a
    node that never had its data."""
    import shutil

    shard = ShardRef(server, actor_name)
    info = shard.call("ready")
    os.kill(info["pid"], signal.SIGSTOP)
    shutil.rmtree(info["data_dir"])
    os.kill(info["pid"], signal.SIGKILL)
    again = shard.ready_after_restart(info["pid"])
    assert again["data_lost"], again
    return str(again["data_lost"])


def test_a_replica_restarted_without_its_data_is_refilled_not_served(
    colshard_server: Server,
) -> None:

    rng = np.random.default_rng(31)
    with httpx.Client(base_url=colshard_server.url, timeout=120) as http:
        _create(http, "RepLost", shards=1, rf=2)
        objs = _objects(rng, 40, 0)
        assert (
            http.post("/v1/collections/RepLost/objects", json={"objects": objs}).json()["n_ok"]
            == 40
        )
        lost = _restart_without_data(colshard_server, "colshard:RepLost:0:1")
        assert "with an empty data directory" in lost
        q = {"near_vector": {"vector": rng.normal(size=(2, DIM)).tolist()}, "limit": 100}
        for _ in range(4):  # never an empty or short answer from the replica that lost it
            r = http.post("/v1/collections/RepLost/query", json=q)
            assert r.status_code == 200 and len(r.json()["objects"]) == 40, r.text[:300]
        _wait_ready(http, "RepLost")  # marked stale, then refilled by the repair loop
        assert _replica_listing(colshard_server, "colshard:RepLost:0:1") == _replica_listing(
            colshard_server, "colshard:RepLost:0:0"
        )
        ShardRef(colshard_server, "colshard:RepLost:0:0").kill(no_restart=True)
        r = http.post("/v1/collections/RepLost/query", json=q)
        assert r.status_code == 200 and len(r.json()["objects"]) == 40, r.text[:300]

        _create(http, "RepLost1", shards=1, rf=1)
        assert (
            http.post("/v1/collections/RepLost1/objects", json={"objects": objs[:5]}).json()["n_ok"]
            == 5
        )
        _restart_without_data(colshard_server, "colshard:RepLost1:0")
        start = time.time()
        r = http.post("/v1/collections/RepLost1/query", json=q)
        assert r.status_code == 503, r.text[:300]
        error = r.json()["error"]
        assert error["code"] == "shard_data_lost" and "empty data directory" in error["message"]
        assert time.time() - start < 5.0  # answered at once, not after the query deadline
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "RepLost1:0" in ready.json()["unavailable_shards"]
        [placement] = http.get("/v1/cluster").json()["collections"]["RepLost1"]["placements"]
        assert placement["state"] == "data_lost" and "empty data directory" in placement["reason"]
        assert http.delete("/v1/collections/RepLost1").status_code == 200
