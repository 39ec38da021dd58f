"""EtcdStore against a real etcd (the session's EmbeddedEtcd, or one of its own where the test
stops and restarts etcd)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cluster.embedded_etcd import EmbeddedEtcd, find_free_port, find_free_ports
from cluster.errors import AlreadyExists, InvalidInput, NotFound, Unavailable
from cluster.etcd_store import EtcdStore
from cluster.spec import CollectionSpec

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

TIMEOUT_S = 5.0


def make_spec(name: str, shard_count: int = 2, dim: int = 8) -> CollectionSpec:
    return CollectionSpec.from_dict(
        {
            "name": name,
            "properties": [{"name": "text", "data_type": "text"}],
            "vectors": [{"name": "colbert", "kind": "multi", "dim": dim}],
            "shard_count": shard_count,
        }
    )


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


async def same_cluster(store: EtcdStore) -> EtcdStore:
    """A second, independent client on the same cluster (another node)."""
    return await EtcdStore.connect(list(store.endpoints), store.cluster_name, TIMEOUT_S)


# ---- collections ---------------------------------------------------------------------------


async def test_create_get_list_delete_collection(etcd_store: EtcdStore) -> None:
    spec = make_spec("Docs")
    assert await etcd_store.get_collection("Docs") is None
    revision = await etcd_store.create_collection(spec)
    assert revision > 0
    assert await etcd_store.get_collection("Docs") == spec
    await etcd_store.create_collection(make_spec("Other", shard_count=1))
    listed = await etcd_store.list_collections()
    assert sorted(listed) == ["Docs", "Other"]
    assert listed["Docs"] == spec

    assert await etcd_store.delete_collection("Docs") is True
    assert await etcd_store.get_collection("Docs") is None
    assert await etcd_store.delete_collection("Docs") is False
    assert sorted(await etcd_store.list_collections()) == ["Other"]


async def test_invalid_names_are_rejected_before_etcd(etcd_store: EtcdStore) -> None:
    with pytest.raises(InvalidInput):
        await etcd_store.get_collection("../evil")
    with pytest.raises(InvalidInput):
        await etcd_store.put_placement("Docs", -1, 0, {})


async def test_duplicate_create_is_409(etcd_store: EtcdStore) -> None:
    await etcd_store.create_collection(make_spec("Docs"))
    with pytest.raises(AlreadyExists) as info:
        await etcd_store.create_collection(make_spec("Docs", shard_count=4))
    assert info.value.code == "already_exists"
    stored = await etcd_store.get_collection("Docs")
    assert stored is not None and stored.shard_count == 2  # the first one is kept


async def test_concurrent_creates_exactly_one_wins(etcd_store: EtcdStore) -> None:
    other = await same_cluster(etcd_store)
    try:
        stores = [etcd_store, other] * 4
        results = await asyncio.gather(
            *(
                s.create_collection(make_spec("Race", shard_count=i + 1))
                for i, s in enumerate(stores)
            ),
            return_exceptions=True,
        )
    finally:
        await other.close()
    winners = [r for r in results if isinstance(r, int)]
    losers = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(winners) == 1 and len(losers) == len(stores) - 1, results
    stored = await etcd_store.get_collection("Race")
    assert stored is not None and stored.shard_count == results.index(winners[0]) + 1


# ---- placement -----------------------------------------------------------------------------


async def test_placements(etcd_store: EtcdStore) -> None:
    await etcd_store.create_collection(make_spec("Docs"))
    await etcd_store.create_collection(make_spec("DocsTwo"))
    info = {"actor": "colshard:Docs:0", "node_id": "n1", "state": "ready", "data_dir": "/d/0"}
    await etcd_store.put_placement("Docs", 0, 0, info)
    await etcd_store.put_placement("Docs", 1, 0, {**info, "actor": "colshard:Docs:1"})
    await etcd_store.put_placement("Docs", 1, 1, {**info, "state": "starting"})
    await etcd_store.put_placement("DocsTwo", 0, 0, info)  # "Docs" must not see this prefix
    await etcd_store.put_placement("Docs", 0, 0, {**info, "state": "draining"})  # overwrite

    placements = await etcd_store.get_placements("Docs")
    assert sorted(placements) == [(0, 0), (1, 0), (1, 1)]
    assert placements[(0, 0)]["state"] == "draining"
    assert placements[(1, 0)]["actor"] == "colshard:Docs:1"

    with pytest.raises(NotFound):
        await etcd_store.put_placement("Missing", 0, 0, info)
    with pytest.raises(InvalidInput):
        await etcd_store.put_placement("Docs", 0, 0, {"bad": object()})

    assert sorted(await etcd_store.get_placements("DocsTwo")) == [(0, 0)]

    # Deleting a collection takes its placements with it, in the same transaction.
    assert await etcd_store.delete_collection("DocsTwo") is True
    assert await etcd_store.get_placements("DocsTwo") == {}


# ---- membership ------------------------------------------------------------------------


async def test_member_lease_refresh_expiry_and_revoke(etcd_store: EtcdStore) -> None:
    crashed = await etcd_store.register_member("node-a", {"host": "10.0.0.1"}, ttl_s=2)
    leaving = await etcd_store.register_member("node-b", {"host": "10.0.0.2"}, ttl_s=2)
    members = await etcd_store.list_members()
    assert members == {"node-a": {"host": "10.0.0.1"}, "node-b": {"host": "10.0.0.2"}}

    await asyncio.sleep(2.5)  # longer than the TTL: only the keep-alive keeps them
    assert sorted(await etcd_store.list_members()) == ["node-a", "node-b"]

    await leaving.revoke()  # graceful leave: gone at once
    assert sorted(await etcd_store.list_members()) == ["node-a"]
    assert not leaving.active and leaving.revoked

    await crashed.stop_refreshing()  # the node dies: the key expires with the lease
    start = time.monotonic()

    async def gone() -> bool:
        return "node-a" not in await etcd_store.list_members()

    await eventually(gone, timeout_s=6.0)
    assert time.monotonic() - start > 0.5  # expired, not deleted
    await asyncio.wait_for(crashed.wait_lost(), 1.0)


async def test_member_registers_again_after_its_lease_expired(etcd_store: EtcdStore) -> None:
    member = await etcd_store.register_member("node-a", {"host": "h"}, ttl_s=2)
    first_lease = member.lease_id
    # What etcd does when a node was cut off for longer than the TTL: the lease is gone.
    await etcd_store._revoke(first_lease)
    assert "node-a" not in await etcd_store.list_members()

    async def back() -> bool:
        return "node-a" in await etcd_store.list_members()

    await eventually(back, timeout_s=5.0)
    assert member.lease_id != first_lease and member.active and not member.lost
    await member.revoke()
    assert "node-a" not in await etcd_store.list_members()


# ---- etcd going away -----------------------------------------------------------------------


async def test_unavailable_on_closed_port_is_fast() -> None:
    port = find_free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await EtcdStore.connect([f"127.0.0.1:{port}"], "test-closed", timeout_s=2.0)
    assert time.monotonic() - start < 2.5
    assert info.value.code == "unavailable"
    assert f"127.0.0.1:{port}" in info.value.details["errors"]


async def test_unavailable_when_etcd_never_answers_is_bounded() -> None:
    # A socket that accepts TCP connections (backlog) but never speaks HTTP/2.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        endpoint = f"127.0.0.1:{mute.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(Unavailable):
            await EtcdStore.connect([endpoint], "test-mute", timeout_s=1.0)
        assert time.monotonic() - start < 2.0


async def test_connect_falls_over_to_a_live_endpoint(etcd_endpoint: str) -> None:
    dead = f"127.0.0.1:{find_free_port()}"
    store = await EtcdStore.connect([dead, etcd_endpoint], "test-failover", timeout_s=2.0)
    try:
        assert store.endpoint == etcd_endpoint
        assert await store.ping() is True
    finally:
        await store.close()


async def test_restart_keeps_state_and_member_lease(tmp_path: Path) -> None:
    client_port, peer_port = find_free_ports(2)
    etcd = EmbeddedEtcd(tmp_path / "etcd", client_port, peer_port)
    endpoint = etcd.start(timeout_s=30.0)
    store = await EtcdStore.connect([endpoint], "restart", timeout_s=2.0)
    try:
        await store.create_collection(make_spec("Kept"))
        member = await store.register_member("node-1", {"host": "h"}, ttl_s=10)
        pid = etcd.pid
        assert pid is not None

        etcd.stop()
        assert etcd.pid is None
        start = time.monotonic()
        with pytest.raises(Unavailable):
            await store.list_collections()
        assert time.monotonic() - start < 3.0  # bounded by timeout_s
        assert await store.ping() is False

        assert etcd.start(timeout_s=30.0) == endpoint  # same data dir, same ports
        assert etcd.pid not in (None, pid)
        assert sorted(await store.list_collections()) == ["Kept"]
        assert await store.ping() is True
        await store.create_collection(make_spec("New"))
        assert sorted(await store.list_collections()) == ["Kept", "New"]
        # The member lease survived the restart and is still refreshed.
        assert "node-1" in await store.list_members()
        assert member.active and not member.lost
    finally:
        await store.close()
        etcd.stop()
    assert etcd.pid is None


async def test_fresh_store_on_restarted_etcd_sees_old_schema(tmp_path: Path) -> None:
    client_port, peer_port = find_free_ports(2)
    with EmbeddedEtcd(tmp_path / "etcd", client_port, peer_port) as etcd:
        async with await EtcdStore.connect([etcd.endpoint], "c", 2.0) as store:
            await store.create_collection(make_spec("Kept"))
    with EmbeddedEtcd(tmp_path / "etcd", client_port, peer_port) as etcd:
        async with await EtcdStore.connect([etcd.endpoint], "c", 2.0) as store:
            kept = await store.get_collection("Kept")
    assert kept == make_spec("Kept")
