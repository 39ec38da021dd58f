"""`colshard serve` as a user runs it: a real process with its own etcd and Ray; Ctrl-C stops
everything it started; a restart on the same data dir keeps collections and objects. The first
run serves HTTP from inside the coordinator actor (the default), the restart from the serve
process itself (``--separate-gateway``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from cluster.embedded_etcd import find_free_ports
from tests.integration.conftest import port_open, start_serve, stop_serve

pytestmark = pytest.mark.integration


def test_serve_restart_keeps_collections_and_objects(tmp_path: Path) -> None:
    port, etcd_port = find_free_ports(2)
    data_dir = tmp_path / "data"
    log = tmp_path / "serve.log"
    rng = np.random.default_rng(5)
    ids = [str(uuid.uuid4()) for _ in range(40)]
    vectors = [rng.normal(size=(int(rng.integers(3, 9)), 16)).astype(np.float32) for _ in ids]
    url = f"http://127.0.0.1:{port}"

    proc = start_serve(data_dir, port, etcd_port, log)
    try:
        assert port_open(etcd_port)
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/collections", json={
                "name": "Keep", "properties": [{"name": "text", "data_type": "text"}],
                "vectors": [{"name": "mv", "dim": 16, "metric": "dot"}]})
            assert r.status_code == 201, r.text
            r = http.post("/v1/collections/Keep/objects", json={"objects": [
                {"id": i, "properties": {"text": f"t{n}"}, "vectors": {"mv": v.tolist()}}
                for n, (i, v) in enumerate(zip(ids, vectors, strict=True))]})
            assert r.json()["n_ok"] == 40
            assert http.get("/readyz").status_code == 200
    finally:
        assert stop_serve(proc) == 0
    # Everything it started is gone: gateway and etcd ports closed.
    assert not port_open(port) and not port_open(etcd_port)

    assert "gateway inside the coordinator actor" in log.read_text()

    proc = start_serve(data_dir, port, etcd_port, log, extra_args=["--separate-gateway"])
    try:
        assert "gateway in this process" in log.read_text()
        with httpx.Client(base_url=url, timeout=60) as http:
            names = [c["name"] for c in http.get("/v1/collections").json()["collections"]]
            assert names == ["Keep"]
            got = http.get(f"/v1/collections/Keep/objects/{ids[3]}",
                           params={"include_vector": "true"}).json()
            assert np.array_equal(np.asarray(got["vectors"]["mv"], dtype=np.float32), vectors[3])
            page = http.get("/v1/collections/Keep/objects", params={"limit": 100}).json()
            assert sorted(o["id"] for o in page["objects"]) == sorted(ids)
            q = vectors[7][:2]
            best = max(range(len(ids)), key=lambda j: float((q @ vectors[j].T).max(1).sum()))
            r = http.post("/v1/collections/Keep/query", json={
                "near_vector": {"vector": q.tolist()}, "limit": 1})
            assert r.json()["objects"][0]["id"] == ids[best]
    finally:
        assert stop_serve(proc) == 0
