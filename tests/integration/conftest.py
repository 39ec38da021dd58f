"""Integration fixtures: one real local Ray per test session (all sockets on 127.0.0.1), and a
colshard gateway (real uvicorn on a free loopback port) in front of a real coordinator actor,
real shard actors and the session's real etcd.

Also helpers for ``colshard serve`` as a real subprocess (its own etcd and Ray): start it, stop
it with Ctrl-C, or SIGKILL every process it started at once (a whole-server crash), found by
session id, parentage and the data/Ray temp directories on their command lines."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.settings import Settings, ShardSettings


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    from gateway.cli import init_ray

    init_ray(None, local_dashboard=False, num_cpus=2)
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


def start_server(
    etcd_endpoint: str,
    data_dir: Path,
    shard: ShardSettings | None = None,
    cluster_name: str | None = None,
    **overrides: Any,
) -> tuple[Server, Any]:
    """A coordinator actor serving the HTTP gateway in its own event loop, as ``colshard
    serve`` runs it (``extra_gateway`` starts a separate gateway process-style)."""
    import ray

    from gateway.cli import get_or_create_coordinator
    from gateway.server import EmbeddedGateway

    port = _free_port()
    settings = Settings(
        data_dir=data_dir,
        cluster_name=cluster_name or f"t{uuid.uuid4().hex[:10]}",
        etcd_endpoints=(etcd_endpoint,),
        host="127.0.0.1",
        port=port,
        max_body_bytes=8 * 1024 * 1024,
        shard=shard or ShardSettings(),
        **overrides,
    )
    handle = get_or_create_coordinator(settings)
    ray.get(
        handle.host.remote(EmbeddedGateway(settings, log_level="warning"), "tests"), timeout=120
    )
    return Server(f"http://127.0.0.1:{port}", settings, handle), handle


def stop_server(srv: Server, running: Any) -> None:
    """Drain the gateway, then kill the cluster's actors."""
    import ray

    from coordinator.actor import ray_namespace

    with contextlib.suppress(Exception):  # the coordinator may be gone already
        ray.get(running.unhost.remote(), timeout=60)
    kill_namespace(ray_namespace(srv.settings.cluster_name))


@pytest.fixture(scope="module")
def colshard_server(
    etcd_endpoint: str, ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A gateway + coordinator for one test module (collections named per test)."""
    srv, running = start_server(
        etcd_endpoint,
        tmp_path_factory.mktemp("data"),
        ShardSettings(seal_threshold_tokens=4096, brute_force_max_tokens=20_000),
    )
    try:
        yield srv
    finally:
        stop_server(srv, running)


# ---- `colshard serve` as a subprocess ------------------------------------------------------


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_serve(
    data_dir: Path,
    port: int,
    etcd_port: int,
    log: Path,
    *,
    ray_tmp: Path | None = None,
    timeout_s: float = 180.0,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``colshard serve`` in a new session, ready (``/healthz`` answers) on return. ``ray_tmp``
    gives its Ray a temp dir of its own (keep the path short: Ray puts sockets under it)."""
    # As a user runs it: serve itself keeps its Ray on loopback (test_serve checks the sockets).
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS")
    }
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    env.update(extra_env or {})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--etcd-port",
            str(etcd_port),
            *extra_args,
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"colshard serve exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"colshard serve did not come up: {log.read_text()[-3000:]}")


def stop_serve(proc: subprocess.Popen[bytes]) -> int:
    """Ctrl-C, as a user stops it; its exit status."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    state: str
    cmdline: str


def process_table() -> dict[int, ProcInfo]:
    """Every process from /proc (Linux)."""
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        table[int(entry)] = ProcInfo(
            int(entry),
            int(fields[1]),
            int(fields[3]),
            fields[0],
            cmdline.replace(b"\0", b" ").decode(errors="replace"),
        )
    return table


def server_processes(root_pid: int, markers: Iterable[str]) -> set[int]:
    """Live (non-zombie) processes of a server started as ``root_pid`` in a new session: the
    root, everything in its session, its descendants (etcd runs in a session of its own), and
    anything whose command line names one of ``markers`` (its data dir, its Ray temp dir), which
    still finds children re-parented after the root died."""
    table = process_table()
    marks = [m for m in markers if m]
    found = {
        p.pid
        for p in table.values()
        if p.pid == root_pid or p.sid == root_pid or any(m in p.cmdline for m in marks)
    }
    grew = True
    while grew:
        more = {p.pid for p in table.values() if p.ppid in found} - found
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    return {pid for pid in found if table[pid].state not in ("Z", "X")}


def kill_serve_hard(
    proc: subprocess.Popen[bytes], markers: Iterable[str], *, timeout_s: float = 60.0
) -> set[int]:
    """A whole-server crash: freeze every process of the server (SIGSTOP, repeated until no new
    one appears), then SIGKILL them all, so none of them runs a shutdown step. Returns the PIDs
    killed; raises if any of them is still alive after ``timeout_s``."""
    marks = list(markers)
    frozen: set[int] = set()
    for _ in range(50):
        new = server_processes(proc.pid, marks) - frozen
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= new
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=timeout_s)
    deadline = time.time() + timeout_s
    while left := server_processes(proc.pid, marks):
        if time.time() > deadline:
            raise RuntimeError(f"processes of the killed server still alive: {sorted(left)}")
        for pid in left:  # started between the last scan and the kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return frozen


def wait_processes_gone(
    root_pid: int, markers: Iterable[str], timeout_s: float = 60.0
) -> dict[int, str]:
    """Wait for a stopped server's processes to exit; returns those still alive (pid ->
    command line) after ``timeout_s``."""
    marks = list(markers)
    deadline = time.time() + timeout_s
    while left := server_processes(root_pid, marks):
        if time.time() > deadline:
            table = process_table()
            return {pid: table[pid].cmdline[:300] for pid in left if pid in table}
        time.sleep(0.2)
    return {}


def wait_ports_closed(ports: Iterable[int], timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    ports = list(ports)
    while busy := [p for p in ports if port_open(p)]:
        if time.time() > deadline:
            raise RuntimeError(f"ports still open: {busy}")
        time.sleep(0.2)
