"""`colshard serve` as a user runs it: a real process with its own etcd and Ray; Ctrl-C stops
everything it started; a restart on the same data dir keeps collections and objects. The first
run serves HTTP from inside the coordinator actor (the default), the restart from the serve
process itself (``--separate-gateway``)."""

from __future__ import annotations

import ipaddress
import uuid
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from cluster.embedded_etcd import find_free_ports
from tests.integration.conftest import port_open, start_serve, stop_serve

pytestmark = pytest.mark.integration


def listening_sockets(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP listening socket and bound UDP socket of
    ``root_pid`` and all its descendants (Ray's GCS, raylet, agents and workers, etcd)."""
    root = psutil.Process(root_pid)
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    found = []
    for pid, proc in procs.items():
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)
            if listening:
                found.append((c.laddr.ip, c.laddr.port, f"{name}[{pid}]"))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def ip_values(tree: object) -> list[str]:
    """Every string in a JSON tree that is an IP address (or ip:port)."""
    out: list[str] = []
    if isinstance(tree, dict):
        for v in tree.values():
            out += ip_values(v)
    elif isinstance(tree, list):
        for v in tree:
            out += ip_values(v)
    elif isinstance(tree, str):
        for candidate in (tree, tree.rsplit(":", 1)[0]):
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                continue
            out.append(candidate)
            break
    return out


def test_loopback_check_itself() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")


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
            r = http.post(
                "/v1/collections",
                json={
                    "name": "Keep",
                    "properties": [{"name": "text", "data_type": "text"}],
                    "vectors": [{"name": "mv", "dim": 16, "metric": "dot"}],
                },
            )
            assert r.status_code == 201, r.text
            r = http.post(
                "/v1/collections/Keep/objects",
                json={
                    "objects": [
                        {"id": i, "properties": {"text": f"t{n}"}, "vectors": {"mv": v.tolist()}}
                        for n, (i, v) in enumerate(zip(ids, vectors, strict=True))
                    ]
                },
            )
            assert r.json()["n_ok"] == 40
            assert http.get("/readyz").status_code == 200
            # Every socket that serve's process tree listens on (etcd, Ray's GCS, raylet,
            # dashboard and agents, the coordinator, shard and node-agent workers, the
            # gateway) is on loopback: nothing beyond this machine can reach Ray.
            sockets = listening_sockets(proc.pid)
            assert len(sockets) >= 8, sockets
            exposed = [s for s in sockets if not is_loopback(s[0])]
            assert not exposed, exposed
            # ... and /v1/cluster reports loopback addresses, not the machine's.
            cluster = http.get("/v1/cluster").json()
            addresses = list(ip_values(cluster))
            assert addresses and all(is_loopback(a) for a in addresses), cluster
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
            got = http.get(
                f"/v1/collections/Keep/objects/{ids[3]}", params={"include_vector": "true"}
            ).json()
            assert np.array_equal(np.asarray(got["vectors"]["mv"], dtype=np.float32), vectors[3])
            page = http.get("/v1/collections/Keep/objects", params={"limit": 100}).json()
            assert sorted(o["id"] for o in page["objects"]) == sorted(ids)
            q = vectors[7][:2]
            best = max(range(len(ids)), key=lambda j: float((q @ vectors[j].T).max(1).sum()))
            r = http.post(
                "/v1/collections/Keep/query",
                json={"near_vector": {"vector": q.tolist()}, "limit": 1},
            )
            assert r.json()["objects"][0]["id"] == ids[best]
    finally:
        assert stop_serve(proc) == 0
