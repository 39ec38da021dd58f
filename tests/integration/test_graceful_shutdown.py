"""SIGTERM to ``colshard serve`` drains: a request in flight completes with 200, new connections
are refused meanwhile, then the process stops everything it started and exits 0.

The in-flight request is made slow with the shard actor's fault injection
(``COLSHARD_FAULT_READ_DELAY_S``: every shard read sleeps that long). ``colshard serve`` runs
with its embedded etcd and its own local Ray; every process carries a marker in its environment
and is checked (and, failing that, killed by PID) at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.procs import free_ports, kill_marked, marked_pids, wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
READ_DELAY_S = 4.0


def etcd_port_pair() -> int:
    """A free client port whose +1 (the embedded etcd's peer port) is free too."""
    for _ in range(50):
        port = free_ports(1)[0]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair")


def test_sigterm_drains_in_flight_request(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:12]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "COLSHARD_"))}
    env.update(
        COLSHARD_TEST_MARKER=marker,
        COLSHARD_FAULT_READ_DELAY_S=str(READ_DELAY_S),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(REPO),
    )
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "data"),
                "--etcd-port",
                str(etcd_port_pair()),
                "--cluster-name",
                f"drain-{marker}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {log_path.read_text()[-3000:]}")
            return httpx.get(f"{url}/healthz").is_success

        wait_until("colshard serve", up, 180)
        http = httpx.Client(base_url=url, timeout=60)
        created = http.post(
            "/v1/collections",
            json={
                "name": "Drain",
                "vectors": [{"name": "v", "kind": "multi", "dim": 4}],
                "shard_count": 1,
            },
        )
        assert created.status_code == 201, created.text
        objects = [{"vectors": {"v": [[1.0, 0.0, 0.0, float(i)]]}} for i in range(3)]
        assert (
            http.post("/v1/collections/Drain/objects", json={"objects": objects}).status_code == 200
        )
        http.close()

        outcome: dict[str, Any] = {}

        def slow_query() -> None:
            started = time.monotonic()
            try:
                response = httpx.post(
                    f"{url}/v1/collections/Drain/query",
                    timeout=60,
                    json={
                        "near_vector": {"vector": [[1.0, 0.0, 0.0, 0.0]]},
                        "target_vector": "v",
                        "limit": 3,
                    },
                )
                outcome.update(status=response.status_code, body=response.json())
            except httpx.HTTPError as exc:
                outcome["error"] = repr(exc)
            outcome["elapsed_s"] = time.monotonic() - started

        worker = threading.Thread(target=slow_query)
        worker.start()
        time.sleep(1.0)  # the query is now waiting on the (delayed) shard
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # draining: no new connections
            httpx.get(f"{url}/healthz", timeout=5)
        worker.join(timeout=60)
        assert outcome.get("status") == 200, (outcome, log_path.read_text()[-3000:])
        assert len(outcome["body"]["objects"]) == 3
        assert outcome["elapsed_s"] >= READ_DELAY_S - 0.5
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-3000:]
        # Within its 10 s exit budget (gateway.cli.EXIT_BUDGET_S), a request in flight
        # included, and with nothing it started left running.
        assert time.monotonic() - signalled < 10.5, log_path.read_text()[-3000:]
        wait_until("serve's Ray and etcd to exit", lambda: not marked_pids(marker), 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        kill_marked(marker)
