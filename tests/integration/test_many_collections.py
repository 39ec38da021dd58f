"""Many small collections on one node: their shards share the node's shard hosts
(``shard.host``), an idle shard costs well under 20 MB of private memory, the cap on
collections answers a clear 422, and deleting them all leaves the host holding nothing.

A CI-sized count (``N`` collections of 2 shards); the 1,000-collection run is in docs/bench.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from shard.host import private_memory_bytes
from tests.integration.conftest import Server, start_server, stop_server
from tests.integration.shards import ShardRef

pytestmark = pytest.mark.integration

N = 60
DIM = 8
IDLE_SHARD_BUDGET_BYTES = 20 * 2**20


@pytest.fixture(scope="module")
def server(
    etcd_endpoint: str, ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv, running = start_server(
        etcd_endpoint, tmp_path_factory.mktemp("many"), max_collections=N + 1
    )
    try:
        yield srv
    finally:
        stop_server(srv, running)


def _create(http: httpx.Client, name: str) -> httpx.Response:
    return http.post(
        "/v1/collections",
        json={
            "name": name,
            "properties": [{"name": "k", "data_type": "int"}],
            "shard_count": 2,
            "vectors": [{"name": "v", "dim": DIM, "kind": "multi", "metric": "dot"}],
        },
    )


def test_many_collections_share_the_hosts_and_idle_shards_are_light(server: Server) -> None:
    import ray

    rng = np.random.default_rng(5)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        # A first collection with data and a search: the host has loaded everything a shard
        # needs (kernels, ScaNN, numpy) before memory is measured.
        assert _create(http, "Warm").status_code == 201
        objs = [
            {"properties": {"k": i}, "vectors": {"v": rng.normal(size=(3, DIM)).tolist()}}
            for i in range(20)
        ]
        r = http.post("/v1/collections/Warm/objects", json={"objects": objs})
        assert r.json()["n_ok"] == 20
        q = {"near_vector": {"vector": objs[3]["vectors"]["v"]}, "limit": 1}
        assert http.post("/v1/collections/Warm/query", json=q).json()["objects"]
        hosts = [ShardRef(server, f"colshard:Warm:{s}") for s in (0, 1)]
        pids = [h.pid() for h in hosts]
        assert pids[0] != pids[1]  # shard s in the node's host s % 2
        time.sleep(2.0)
        before = sum(private_memory_bytes(p) for p in pids)
        assert before > 0

        start = time.monotonic()
        for i in range(N):
            r = _create(http, f"Many{i}")
            assert r.status_code == 201, r.text
        took = time.monotonic() - start
        r = _create(http, "OneTooMany")
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"]["limit"] == "max_collections"
        time.sleep(2.0)
        per_shard = (sum(private_memory_bytes(p) for p in pids) - before) / (2 * N)
        assert per_shard <= IDLE_SHARD_BUDGET_BYTES, per_shard
        print(f"{N} collections in {took:.1f} s; {per_shard / 2**20:.2f} MB per idle shard")

        # Every shard s is in this node's host s, and each one answers.
        for s, host in enumerate(hosts):
            held = set(ray.get(host.host.info.remote(), timeout=60)["shards"])
            assert {f"colshard:Many{i}:{s}" for i in range(N)} <= held
        assert ShardRef(server, f"colshard:Many{N - 1}:1").pid() == pids[1]
        one = {"properties": {"k": 1}, "vectors": {"v": rng.normal(size=(2, DIM)).tolist()}}
        r = http.post(f"/v1/collections/Many{N - 1}/objects", json={"objects": [one]})
        assert r.json()["n_ok"] == 1
        q = {"near_vector": {"vector": one["vectors"]["v"]}, "limit": 1}
        assert len(http.post(f"/v1/collections/Many{N - 1}/query", json=q).json()["objects"]) == 1
        placements = http.get("/v1/cluster").json()["collections"]["Many7"]["placements"]
        assert [p["state"] for p in placements] == ["ready", "ready"]

        for i in range(N):
            assert http.delete(f"/v1/collections/Many{i}").status_code == 200
        assert http.delete("/v1/collections/Warm").status_code == 200
        deadline = time.monotonic() + 30
        while any(ray.get(h.host.info.remote(), timeout=60)["shards"] for h in hosts):
            assert time.monotonic() < deadline, "a host still holds dropped shards"
            time.sleep(0.2)
        assert [h.pid() for h in hosts] == pids  # the same processes all along
