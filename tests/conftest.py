"""Shared fixtures.

Unit tests use none of the servers below. Integration tests (``pytest.mark.integration``) share
servers started once per session: each listens on 127.0.0.1 only and is stopped by PID at the
end. Async tests run on anyio's pytest plugin with the asyncio backend
(``pytest.mark.anyio``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from cluster.embedded_etcd import EmbeddedEtcd, find_free_ports
from cluster.etcd_store import EtcdStore

ETCD_TIMEOUT_S = 5.0


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# ---- etcd ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real etcd for the whole session: "127.0.0.1:<port>"."""
    client_port, peer_port = find_free_ports(2)
    etcd = EmbeddedEtcd(tmp_path_factory.mktemp("etcd"), client_port, peer_port)
    endpoint = etcd.start(timeout_s=30.0)
    try:
        yield endpoint
    finally:
        etcd.stop()


def unique_cluster_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def etcd_store(etcd_endpoint: str, anyio_backend: str) -> AsyncIterator[EtcdStore]:
    """A store on the session etcd, under a cluster name of its own (tests never see each
    other's keys)."""
    store = await EtcdStore.connect([etcd_endpoint], unique_cluster_name(), ETCD_TIMEOUT_S)
    try:
        yield store
    finally:
        await store.close()
