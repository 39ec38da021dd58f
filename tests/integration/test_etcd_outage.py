"""etcd outages against a real etcd of the test's own (not the session's), a real coordinator,
real shard actors and real HTTP.

1. etcd frozen (SIGSTOP) for ``OUTAGE_S`` seconds: queries and writes keep working from the
   coordinator's in-memory routing table; schema changes fail fast with 503 (bounded by the etcd
   timeout, 2 s here) and drop nothing.
2. etcd killed (SIGKILL) and restarted on the same data dir and ports: the same, and once it is
   back the cluster reconverges without a restart: schema changes work again, the coordinator's
   membership lease is re-established and the placement records are there.

``COLSHARD_ETCD_OUTAGE_S`` sets the freeze (default 30 s, the drill the product promises).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cluster.embedded_etcd import EmbeddedEtcd, find_free_ports
from cluster.settings import ShardSettings
from tests.integration.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.integration
OUTAGE_S = float(os.environ.get("COLSHARD_ETCD_OUTAGE_S", "30"))
ETCD_TIMEOUT_S = 2.0
DIM = 8


def _start(etcd_endpoint: str, data_dir: Path) -> tuple[Server, Any]:
    """tests/integration/conftest.start_server with a short etcd timeout."""
    return start_server(
        etcd_endpoint,
        data_dir,
        ShardSettings(fsync=False),
        cluster_name=f"o{uuid.uuid4().hex[:10]}",
        etcd_timeout_s=ETCD_TIMEOUT_S,
        query_timeout_s=10.0,
    )


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    client_port, peer_port = find_free_ports(2)
    etcd = EmbeddedEtcd(tmp_path / "etcd", client_port, peer_port)
    etcd.start(timeout_s=30.0)
    try:
        yield etcd
    finally:
        pid = etcd.pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        etcd.stop()


def _objects(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "properties": {"k": int(rng.integers(1000))},
            "vectors": {"v": rng.normal(size=(2, DIM)).tolist()},
        }
        for _ in range(n)
    ]


def _spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "properties": [{"name": "k", "data_type": "int"}],
        "vectors": [{"name": "v", "dim": DIM, "metric": "dot"}],
        "shard_count": 2,
        "replication_factor": 2,
    }


def _serve_traffic(
    http: httpx.Client, rng: np.random.Generator, acked: set[str], seconds: float
) -> int:
    """Writes and queries for ``seconds``; every one must succeed. Returns the count."""
    n = 0
    end = time.time() + seconds
    while time.time() < end:
        batch = _objects(rng, 10)
        r = http.post("/v1/collections/Outage/objects", json={"objects": batch})
        assert r.status_code == 200 and r.json()["n_ok"] == 10, r.text
        acked.update(o["id"] for o in batch)
        r = http.post(
            "/v1/collections/Outage/query",
            json={"near_vector": {"vector": rng.normal(size=(2, DIM)).tolist()}, "limit": 5},
        )
        assert r.status_code == 200 and len(r.json()["objects"]) == 5, r.text
        some = next(iter(acked))
        assert http.get(f"/v1/collections/Outage/objects/{some}").status_code == 200
        n += 1
    return n


def _schema_change_fails_fast(http: httpx.Client) -> None:
    for call in (
        lambda: http.post("/v1/collections", json=_spec("Other")),
        lambda: http.delete("/v1/collections/Outage"),
    ):
        start = time.time()
        r = call()
        took = time.time() - start
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable"
        assert took < 3 * ETCD_TIMEOUT_S + 1, took


@pytest.mark.parametrize("outage_s", [OUTAGE_S])
def test_etcd_outage_keeps_data_path_and_reconverges(
    own_etcd: EmbeddedEtcd, ray_session: None, tmp_path: Path, outage_s: float
) -> None:
    rng = np.random.default_rng(31)
    srv, running = _start(own_etcd.endpoint, tmp_path / "data")
    acked: set[str] = set()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.post("/v1/collections", json=_spec("Outage")).status_code == 201
            _serve_traffic(http, rng, acked, 1.0)

            # 1. frozen etcd
            pid = own_etcd.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                start = time.time()
                _schema_change_fails_fast(http)
                n = _serve_traffic(http, rng, acked, max(0.0, outage_s - (time.time() - start)))
                assert n > 0
                assert http.get("/readyz").status_code == 503
                _schema_change_fails_fast(http)
            finally:
                os.kill(pid, signal.SIGCONT)

            # 2. etcd killed, restarted on the same data dir and ports
            own_etcd.kill()
            _serve_traffic(http, rng, acked, 3.0)
            _schema_change_fails_fast(http)
            own_etcd.start(timeout_s=30.0)
            _serve_traffic(http, rng, acked, 1.0)

            # reconverged without a restart: schema changes, membership, placements
            deadline = time.time() + 60
            while True:
                r = http.post("/v1/collections", json=_spec("After"))
                if r.status_code == 201:
                    break
                assert r.status_code == 503 and time.time() < deadline, r.text
                time.sleep(1.0)
            while True:
                r = http.get("/v1/cluster")
                info = r.json() if r.status_code == 200 else {}
                if info.get("members") and http.get("/readyz").status_code == 200:
                    break
                assert time.time() < deadline, r.text
                time.sleep(1.0)
            placements = info["collections"]["Outage"]["placements"]
            assert len(placements) == 4 and {p["state"] for p in placements} == {"ready"}
            assert http.delete("/v1/collections/After").status_code == 200

            # nothing acknowledged was lost
            seen: set[str] = set()
            after = None
            while True:
                page = http.get(
                    "/v1/collections/Outage/objects",
                    params={"limit": 1000, **({"after": after} if after else {})},
                ).json()
                seen.update(o["id"] for o in page["objects"])
                if not page["next_after"]:
                    break
                after = page["next_after"]
            assert acked <= seen
            assert http.delete("/v1/collections/Outage").status_code == 200
    finally:
        stop_server(srv, running)
