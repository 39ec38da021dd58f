"""Integration fixtures: one real local Ray per test session (all sockets on 127.0.0.1), and a
colshard gateway (real uvicorn on a free loopback port) in front of a real coordinator actor,
real shard actors and the session's real etcd."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.settings import Settings, ShardSettings


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class Server:
    url: str
    settings: Settings
    handle: Any


def _free_port() -> int:
    from cluster.embedded_etcd import find_free_ports

    return find_free_ports(1)[0]


def kill_namespace(namespace: str) -> None:
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace:
            with contextlib.suppress(ValueError):  # already gone
                ray.kill(ray.get_actor(entry["name"], namespace=namespace), no_restart=True)


def start_server(etcd_endpoint: str, data_dir: Path, shard: ShardSettings | None = None,
                 cluster_name: str | None = None) -> tuple[Server, Any]:
    import uvicorn

    from coordinator.actor import ray_namespace  # noqa: F401 (import check)
    from gateway.app import create_app
    from gateway.backend import RayBackend
    from gateway.cli import get_or_create_coordinator

    port = _free_port()
    settings = Settings(data_dir=data_dir, cluster_name=cluster_name or
                        f"t{uuid.uuid4().hex[:10]}", etcd_endpoints=(etcd_endpoint,),
                        host="127.0.0.1", port=port, max_body_bytes=8 * 1024 * 1024,
                        shard=shard or ShardSettings())
    handle = get_or_create_coordinator(settings)
    app = create_app(RayBackend(handle, settings.query_timeout_s), settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.05)
    return Server(f"http://127.0.0.1:{port}", settings, handle), (server, thread)


def stop_server(srv: Server, running: Any) -> None:
    from coordinator.actor import ray_namespace

    server, thread = running
    server.should_exit = True
    thread.join(timeout=15)
    kill_namespace(ray_namespace(srv.settings.cluster_name))


@pytest.fixture(scope="module")
def colshard_server(etcd_endpoint: str, ray_session: None,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway + coordinator for one test module (collections named per test)."""
    srv, running = start_server(
        etcd_endpoint, tmp_path_factory.mktemp("data"),
        ShardSettings(seal_threshold_tokens=4096, brute_force_max_tokens=20_000))
    try:
        yield srv
    finally:
        stop_server(srv, running)
