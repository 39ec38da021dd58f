"""The same-node fast path for shard reads (``cluster.localrpc``, ``shard.fastpath``, the client
in ``coordinator.fanout``): real Unix sockets, the Ray handle faked behind the same
``.remote().future()`` shape."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import DeadlineExceeded, InternalError, NotFound, Unavailable
from cluster.ids import ShardId
from cluster.localrpc import socket_dir
from cluster.raynode import ray_node_id
from cluster.types import VectorSearch
from coordinator.fanout import FastPathClient, FastPathDown, RayShardClient
from shard.fastpath import FastPathServer

pytestmark = pytest.mark.anyio
WHAT, DETAILS = "shard C:0", {"shard": "C:0"}


def _missing(uuid: str) -> None:
    raise NotFound(f"object {uuid} not found", {"id": uuid})


def _broken() -> None:
    raise RuntimeError("boom")


@pytest.fixture
def server(tmp_path: Path) -> Any:
    srv = FastPathServer(
        {
            "echo": lambda *a: a,
            "missing": _missing,
            "broken": _broken,
            "slow": lambda s: time.sleep(s) or "late",
        },
        directory=tmp_path,
    )
    yield srv
    srv.close()


async def test_round_trip_errors_and_connection_reuse(server: FastPathServer) -> None:
    client = FastPathClient(str(server.path))
    assert await client.call("echo", (1, "two", [3.0]), 5.0, WHAT, DETAILS) == (1, "two", [3.0])
    assert len(client._idle) == 1
    for _ in range(3):  # the same connection, one call at a time
        assert await client.call("echo", ("x",), 5.0, WHAT, DETAILS) == ("x",)
    assert len(client._idle) == 1
    with pytest.raises(NotFound, match="object u1 not found"):  # the shard's own error
        await client.call("missing", ("u1",), 5.0, WHAT, DETAILS)
    with pytest.raises(InternalError, match="boom"):
        await client.call("broken", (), 5.0, WHAT, DETAILS)
    with pytest.raises(InternalError, match="unknown verb"):
        await client.call("drop", (), 5.0, WHAT, DETAILS)
    # concurrent calls open more connections; all answer
    results = await asyncio.gather(
        *(client.call("echo", (i,), 5.0, WHAT, DETAILS) for i in range(5))
    )
    assert results == [(i,) for i in range(5)]
    client.close()


async def test_calls_in_flight_per_host_socket_are_capped(server: FastPathServer) -> None:
    client = FastPathClient.shared(str(server.path))
    assert FastPathClient.shared(str(server.path)) is client  # the host's shards share it
    cap = FastPathClient.MAX_CALLS
    loop = asyncio.get_running_loop()
    start = loop.time()
    out = await asyncio.gather(
        *(client.call("slow", (0.2,), 10.0, WHAT, DETAILS) for _ in range(2 * cap))
    )
    assert out == ["late"] * (2 * cap)
    assert loop.time() - start >= 0.38  # two waves of MAX_CALLS, not all at once
    assert len(client._idle) == cap
    client.close()


async def test_deadline_and_a_closed_server(server: FastPathServer) -> None:
    client = FastPathClient(str(server.path))
    with pytest.raises(DeadlineExceeded, match="shard C:0 did not answer in time"):
        await client.call("slow", (0.5,), 0.05, WHAT, DETAILS)
    assert client._idle == []  # a connection left mid-call is never reused
    assert await client.call("echo", (1,), 5.0, WHAT, DETAILS) == (1,)
    server.close()
    assert not server.path.exists()
    with pytest.raises(FastPathDown):
        await client.call("echo", (1,), 5.0, WHAT, DETAILS)  # the pooled connection is gone
    with pytest.raises(FastPathDown):
        await client.call("echo", (1,), 5.0, WHAT, DETAILS)  # and nobody listens any more


def test_socket_dir_is_private_and_stale_sockets_are_removed(tmp_path: Path) -> None:
    directory = socket_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    dead = tmp_path / "999999999-dead.sock"  # no such pid
    dead.touch()
    mine = tmp_path / f"{os.getpid()}-alive.sock"
    mine.touch()
    srv = FastPathServer({}, directory=tmp_path)
    try:
        assert not dead.exists() and mine.exists()
        assert stat.S_IMODE(srv.path.stat().st_mode) == 0o600
    finally:
        srv.close()


# A search request; the shard client hands each shard its deadline budget (budget_s).
Q = VectorSearch(target_vector="q", query=np.zeros((1, 2), dtype=np.float32), k=1)


def _answer(via: str) -> Callable[..., str]:
    """A search verb answering which way it came: ``(req)``, or ``(key, req)`` on a host."""
    return lambda *args: f"{via}:{args[-1].target_vector}:{args[-1].budget_s}"


class FakeRef:
    def __init__(self, value: Any) -> None:
        self.value = value

    def future(self) -> concurrent.futures.Future[Any]:
        f: concurrent.futures.Future[Any] = concurrent.futures.Future()
        f.set_result(self.value)
        return f


class FakeHost:
    """A shard host's Ray handle shape: ``host.open|call.options(name=...).remote(...)`` and
    ``.future()``; records the verbs called (``open`` answers ``verbs["ready"]``)."""

    def __init__(self, verbs: dict[str, Callable[..., Any]]) -> None:
        self.calls: list[str] = []
        self.task_names: list[str] = []
        self.open = self._method(lambda key, *args: verbs["ready"]())
        self.call = self._method(lambda key, verb, args: self._call(verbs, verb, args))

    def _call(self, verbs: dict[str, Callable[..., Any]], verb: str, args: Any) -> Any:
        self.calls.append(verb)
        return verbs[verb](*args)

    def _method(self, fn: Callable[..., Any]) -> Any:
        names = self.task_names

        class Method:
            @staticmethod
            def options(name: str) -> Any:
                names.append(name)
                return Method

            @staticmethod
            def remote(*args: Any) -> FakeRef:
                return FakeRef(fn(*args))

        return Method


class FakeLocator:
    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def locate(self, key: str, host_died: bool = False) -> tuple[Any, tuple[Any, ...]]:
        return self.host, ()

    def opened(self, key: str) -> None:
        pass


async def test_the_client_uses_the_fast_path_on_its_node_and_falls_back_to_ray(
    tmp_path: Path,
) -> None:
    srv = FastPathServer({"search": _answer("fast")}, directory=tmp_path)
    here = ray_node_id()  # "" unless this test session started Ray (the integration tests do)
    info: dict[str, Any] = {"node_id": here, "fast_path": str(srv.path)}
    handle = FakeHost({"ready": lambda: dict(info), "search": _answer("ray")})
    client = RayShardClient(ShardId("C", 0), "colshard:C:0", FakeLocator(handle))
    assert await client.search(Q, 5.0) == "ray:q:5.0"  # nothing learned yet: over Ray
    await client.ready(5.0)
    handle.calls.clear()
    assert await client.search(Q, 5.0) == "fast:q:5.0"
    assert handle.calls == []
    srv.close()  # the actor died: this call and the next go over Ray
    assert await client.search(Q, 5.0) == "ray:q:5.0"
    assert await client.search(Q, 5.0) == "ray:q:5.0"
    assert handle.calls == ["search", "search"]
    assert "colshard:C:0.search" in handle.task_names  # the dashboard names the shard
    info["node_id"] = "another-node"  # a replica elsewhere: never the fast path
    srv2 = FastPathServer({"search": _answer("fast")}, directory=tmp_path)
    info["fast_path"] = str(srv2.path)
    try:
        await client.ready(5.0)
        assert await client.search(Q, 5.0) == "ray:q:5.0"
        info["node_id"] = here
        await client.ready(5.0)  # back on this node (a restart): learned again
        assert await client.search(Q, 5.0) == "fast:q:5.0"
    finally:
        srv2.close()


async def test_a_dropped_copy_is_never_reopened() -> None:
    """After ``drop`` (its collection deleted, or it moved) the client refuses every call and
    never opens the shard again, even where its host no longer holds it."""
    opened: list[str] = []
    handle = FakeHost(
        {"ready": lambda: opened.append("open") or {"node_id": "x"}, "drop": lambda: None}
    )
    client = RayShardClient(ShardId("C", 0), "colshard:C:0", FakeLocator(handle))
    await client.ready(5.0)
    await client.drop(5.0)
    with pytest.raises(Unavailable, match="dropped"):
        await client.search(Q, 5.0)
    with pytest.raises(Unavailable, match="dropped"):
        await client.ready(5.0)
    assert opened == ["open"] and handle.calls == ["drop"]
