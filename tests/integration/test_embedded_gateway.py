"""The HTTP gateway hosted inside a real coordinator actor (real Ray, real etcd, real HTTP):
``host`` / ``hosting`` / ``unhost`` with owners, a taken port refused with its address, and
``keep_hosted`` bringing the gateway back after Ray restarts a crashed coordinator."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.embedded_etcd import find_free_ports
from cluster.settings import Settings, ShardSettings
from tests.integration.conftest import kill_namespace, port_open

pytestmark = pytest.mark.integration


def _coordinator(etcd_endpoint: str, data_dir: Path, port: int) -> tuple[Settings, Any]:
    from gateway.cli import get_or_create_coordinator

    settings = Settings(
        data_dir=data_dir,
        cluster_name=f"emb{uuid.uuid4().hex[:8]}",
        etcd_endpoints=(etcd_endpoint,),
        host="127.0.0.1",
        port=port,
        shard=ShardSettings(),
    )
    return settings, get_or_create_coordinator(settings)


def _roundtrip(url: str) -> None:
    """Create a collection, write two objects, find one by MaxSim: the whole path works."""
    name = f"E{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post(
            "/v1/collections",
            json={"name": name, "vectors": [{"name": "v", "dim": 4}], "shard_count": 2},
        )
        assert r.status_code == 201, r.text
        r = http.post(
            f"/v1/collections/{name}/objects",
            json={
                "objects": [
                    {"id": str(uuid.UUID(int=i + 1)), "vectors": {"v": [[1.0, 0, 0, float(i)]]}}
                    for i in range(2)
                ]
            },
        )
        assert r.json()["n_ok"] == 2, r.text
        r = http.post(
            f"/v1/collections/{name}/query",
            json={"near_vector": {"vector": [[0.0, 0.0, 0.0, 1.0]]}, "limit": 1},
        )
        assert r.status_code == 200, r.text
        assert r.json()["objects"][0]["id"] == str(uuid.UUID(int=2))


def test_host_hosting_unhost_and_a_taken_port(
    etcd_endpoint: str, ray_session: None, tmp_path: Path
) -> None:
    import ray

    from gateway.server import EmbeddedGateway

    port = find_free_ports(1)[0]
    settings, handle = _coordinator(etcd_endpoint, tmp_path / "data", port)
    try:
        assert ray.get(handle.hosting.remote()) is None
        where = ray.get(
            handle.host.remote(EmbeddedGateway(settings, log_level="warning"), "me"), timeout=120
        )
        assert where["owner"] == "me" and where["pid"] != 0
        assert ray.get(handle.hosting.remote()) == "me"
        _roundtrip(f"http://127.0.0.1:{port}")
        # The coordinator searched its (same-node) shards over their Unix sockets, not Ray.
        hosts = [
            ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).info.remote())
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == f"colshard-{settings.cluster_name}"
            and a["name"].startswith("colshard:host:")
        ]
        served = [
            h["fast_path_served"] for h in hosts if any("colshard:E" in k for k in h["shards"])
        ]
        assert len(served) == 2 and sum(served) >= 1, hosts  # shard s in the node's host s
        # Another owner's unhost leaves it running; the owner's own drains and closes it.
        assert ray.get(handle.unhost.remote("someone-else")) is False
        assert port_open(port)
        assert ray.get(handle.unhost.remote("me")) is True
        assert not port_open(port)
        assert ray.get(handle.hosting.remote()) is None

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            gateway = EmbeddedGateway(replace(settings, port=busy))
            with pytest.raises(ray.exceptions.RayTaskError) as info:
                ray.get(handle.host.remote(gateway, "me"), timeout=120)
            assert isinstance(info.value.cause, OSError)
            assert f"cannot serve HTTP on 127.0.0.1:{busy}" in str(info.value.cause)
        assert ray.get(handle.hosting.remote()) is None

        # Two at once: one server, one port; the other is drained and closed.
        ports = dict(zip("ab", find_free_ports(2), strict=True))
        ray.get(
            [
                handle.host.remote(
                    EmbeddedGateway(replace(settings, port=p), log_level="warning"), owner
                )
                for owner, p in ports.items()
            ],
            timeout=120,
        )
        owner = ray.get(handle.hosting.remote())
        assert owner in ports
        assert {o: port_open(p) for o, p in ports.items()} == {o: o == owner for o in ports}
    finally:
        kill_namespace(f"colshard-{settings.cluster_name}")


def test_keep_hosted_brings_the_gateway_back_after_a_coordinator_crash(
    etcd_endpoint: str, ray_session: None, tmp_path: Path
) -> None:
    import ray

    from gateway.cli import keep_hosted
    from gateway.server import EmbeddedGateway

    port = find_free_ports(1)[0]
    settings, handle = _coordinator(etcd_endpoint, tmp_path / "data", port)
    gateway = EmbeddedGateway(settings, log_level="warning")
    stop = threading.Event()
    watcher = threading.Thread(
        target=keep_hosted, args=(handle, gateway, "me", 0.5, stop), daemon=True
    )
    try:
        before = ray.get(handle.host.remote(gateway, "me"), timeout=120)
        watcher.start()
        _roundtrip(f"http://127.0.0.1:{port}")
        ray.kill(handle, no_restart=False)  # a crash: Ray restarts the actor, without server
        deadline = time.time() + 120
        while True:
            try:
                where = ray.get(handle.whereabouts.remote(), timeout=10)
                if where["pid"] != before["pid"] and ray.get(handle.hosting.remote()) == "me":
                    break
            except ray.exceptions.RayError:
                pass  # restarting
            assert time.time() < deadline, "the gateway was not hosted again"
            time.sleep(0.5)
        _roundtrip(f"http://127.0.0.1:{port}")
    finally:
        stop.set()
        watcher.join(timeout=10)
        kill_namespace(f"colshard-{settings.cluster_name}")


def test_api_keys_and_tls_inside_the_coordinator(
    etcd_endpoint: str, ray_session: None, tmp_path: Path
) -> None:
    """What ``colshard serve --api-keys-file F --ssl-certfile C --ssl-keyfile K`` hosts: the
    keys and the certificate travel to the coordinator actor with the gateway."""
    import ray

    from gateway.auth import parse_api_keys
    from gateway.server import EmbeddedGateway
    from tests.integration.test_auth import KEYS_FILE, READER, self_signed

    port = find_free_ports(1)[0]
    settings, handle = _coordinator(etcd_endpoint, tmp_path / "data", port)
    cert, key = self_signed(tmp_path)
    gateway = EmbeddedGateway(
        settings,
        api_keys=parse_api_keys(KEYS_FILE),
        ssl_certfile=cert,
        ssl_keyfile=key,
        log_level="warning",
    )
    try:
        ray.get(handle.host.remote(gateway, "me"), timeout=120)
        url = f"https://127.0.0.1:{port}"
        assert gateway.address == url
        with httpx.Client(base_url=url, verify=cert, timeout=30) as http:
            assert http.get("/v1/collections").status_code == 401
            ok = http.get("/v1/collections", headers={"Authorization": f"Bearer {READER}"})
            assert ok.status_code == 200 and ok.json() == {"collections": []}
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    finally:
        kill_namespace(f"colshard-{settings.cluster_name}")
