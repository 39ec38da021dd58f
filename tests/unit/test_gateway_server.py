"""``gateway.server``: the listening socket the embedded gateway binds, ``EmbeddedGateway`` run
and stopped in an event loop (real uvicorn, real HTTP on 127.0.0.1, a fake coordinator behind
the same verbs), and ``LocalTransport``'s detach semantics."""

from __future__ import annotations

import asyncio
import pickle
import socket
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cluster.embedded_etcd import find_free_ports
from cluster.errors import DeadlineExceeded
from cluster.query import QueryRequest, QueryResult, ResultObject
from cluster.settings import Settings
from gateway.backend import LocalTransport
from gateway.server import EmbeddedGateway, bind

pytestmark = pytest.mark.anyio


async def test_bound_socket_gives_nodelay_connections() -> None:
    """asyncio sets TCP_NODELAY on accepted connections only for a socket that names its
    protocol; without it every response waited out the client's delayed ACK (~40 ms)."""
    port = find_free_ports(1)[0]
    sock = bind("127.0.0.1", port)
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        seen.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert seen and seen[0] != 0


def test_bind_to_a_taken_port_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)


class FakeCoordinator:
    """The coordinator verbs the routes below call; ``query`` answers the best of three."""

    def __init__(self) -> None:
        self.queries: list[QueryRequest] = []

    async def readiness(self) -> dict[str, Any]:
        return {"ready": True}

    async def query(self, req: QueryRequest) -> QueryResult:
        self.queries.append(req)
        assert req.near_vector is not None
        docs = np.eye(3, 4, dtype=np.float32)
        scores = (req.near_vector @ docs.T).max(axis=0)
        best = int(np.argmax(scores))
        return QueryResult(
            (ResultObject(f"doc-{best}", {}, {"score": float(scores[best])}),), (), 0.001
        )


def _gateway(port: int, tmp_path: Path) -> EmbeddedGateway:
    return EmbeddedGateway(
        Settings(data_dir=tmp_path, host="127.0.0.1", port=port), log_level="warning"
    )


async def test_embedded_gateway_serves_the_target_and_drains_on_stop(tmp_path: Path) -> None:
    port = find_free_ports(1)[0]
    gateway = _gateway(port, tmp_path)
    target = FakeCoordinator()
    started = asyncio.Event()
    task = asyncio.get_running_loop().create_task(gateway.run(target, started))
    await asyncio.wait_for(started.wait(), 30)
    async with httpx.AsyncClient(base_url=gateway.address, timeout=30) as http:
        assert (await http.get("/readyz")).json() == {"ready": True}
        r = await http.post(
            "/v1/collections/C/query",
            json={"near_vector": {"vector": [[0.0, 0.0, 1.0, 0.0]]}, "limit": 1},
        )
        assert r.status_code == 200, r.text
        assert r.json()["objects"][0]["id"] == "doc-2"
    assert target.queries[0].collection == "C"
    gateway.stop()
    await asyncio.wait_for(task, 30)
    with socket.socket() as probe:  # the listening socket is closed
        assert probe.connect_ex(("127.0.0.1", port)) != 0


async def test_embedded_gateway_on_a_taken_port_fails_before_starting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gateway = _gateway(taken.getsockname()[1], tmp_path)
        started = asyncio.Event()
        with pytest.raises(OSError, match="cannot serve HTTP"):
            await gateway.run(FakeCoordinator(), started)
        assert not started.is_set()


async def test_stop_before_run_exits_at_once(tmp_path: Path) -> None:
    gateway = _gateway(find_free_ports(1)[0], tmp_path)
    gateway.stop()
    await asyncio.wait_for(gateway.run(FakeCoordinator(), asyncio.Event()), 30)


def test_embedded_gateway_pickles_without_its_server(tmp_path: Path) -> None:
    gateway = _gateway(find_free_ports(1)[0], tmp_path)
    gateway.stop()
    copy = pickle.loads(pickle.dumps(gateway))
    assert copy.settings == gateway.settings and copy.address == gateway.address
    assert copy.__dict__["_server"] is None and copy.__dict__["_stopped"] is False


class Slow:
    def __init__(self) -> None:
        self.finished = asyncio.Event()

    async def work(self) -> str:
        await asyncio.sleep(0.2)
        self.finished.set()
        return "done"


@pytest.mark.parametrize("detach", [False, True])
async def test_local_backend_timeout_is_a_deadline_and_detach_lets_the_work_finish(
    detach: bool,
) -> None:
    target = Slow()
    backend = LocalTransport(target, detach=detach)
    with pytest.raises(DeadlineExceeded, match="did not answer work in time"):
        await backend.call("work", (), 0.01)
    await asyncio.sleep(0.4)
    assert target.finished.is_set() is detach  # not detached: the work was cancelled
    assert await backend.call("work", (), 5) == "done"


class SlowQuery(Slow):
    async def query(self) -> str:
        return await self.work()


async def test_local_backend_cancels_a_query_it_gives_up_on_even_when_detaching() -> None:
    target = SlowQuery()
    backend = LocalTransport(target, detach=True)
    with pytest.raises(DeadlineExceeded, match="did not answer query in time"):
        await backend.call("query", (), 0.01)
    await asyncio.sleep(0.4)
    assert not target.finished.is_set()  # read-only: cancelled, not left running
    assert await backend.call("query", (), 5) == "done"
