"""cluster/etcd_store.py without etcd: endpoint parsing and the one error-mapping table."""

from __future__ import annotations

import asyncio

import aetcd.exceptions as ae
import grpc
import pytest

from cluster.errors import (
    ColshardError,
    InternalError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from cluster.etcd_store import EtcdStore, _map_error, parse_endpoint


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="boom")


def wrapped(cls: type[ae.ClientError], code: grpc.StatusCode) -> ae.ClientError:
    """What aetcd raises: its own error, ``from`` the gRPC one."""
    try:
        raise cls("boom") from rpc_error(code)
    except ae.ClientError as exc:
        return exc


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:2379", ("127.0.0.1", 2379)),
        ("http://etcd-0.etcd:2379/", ("etcd-0.etcd", 2379)),
        (" localhost:1 ", ("localhost", 1)),
        ("[::1]:2379", ("::1", 2379)),
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:", ":2379", "host:0", "host:70000", "h:x"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_endpoint(text)


def test_store_arguments_are_validated() -> None:
    with pytest.raises(InvalidInput):
        EtcdStore([], "c", 1.0)
    with pytest.raises(InvalidInput):
        EtcdStore(["127.0.0.1:2379"], "bad/name", 1.0)
    with pytest.raises(InvalidInput):
        EtcdStore(["127.0.0.1:2379"], "c", 0)
    store = EtcdStore("127.0.0.1:1,127.0.0.1:2", "c", 1.0)  # type: ignore[arg-type]
    assert store.endpoints == ("127.0.0.1:1", "127.0.0.1:2")


@pytest.mark.parametrize(
    "exc,expected",
    [
        (ae.ConnectionFailedError("refused"), Unavailable),
        (ae.ConnectionTimeoutError("slow"), Unavailable),
        (ae.WatchTimeoutError(), Unavailable),
        (TimeoutError(), Unavailable),
        (ConnectionResetError(), Unavailable),
        (asyncio.CancelledError(), Unavailable),  # gRPC call killed by a closed channel
        (rpc_error(grpc.StatusCode.UNAVAILABLE), Unavailable),
        (rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), Unavailable),
        (wrapped(ae.ClientError, grpc.StatusCode.CANCELLED), Unavailable),
        (wrapped(ae.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED), Unavailable),
        (wrapped(ae.ClientError, grpc.StatusCode.NOT_FOUND), NotFound),
        (wrapped(ae.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT), InvalidInput),
        (ae.RevisionCompactedError(5), InternalError),
        (wrapped(ae.InternalError, grpc.StatusCode.INTERNAL), InternalError),
        (RuntimeError("?"), InternalError),
    ],
)
def test_error_table(exc: BaseException, expected: type[ColshardError]) -> None:
    err = _map_error(exc, "get", "127.0.0.1:2379")
    assert type(err) is expected
    assert err.details["op"] == "get" and err.details["endpoint"] == "127.0.0.1:2379"


def test_colshard_errors_pass_through() -> None:
    own = NotFound("x")
    assert _map_error(own, "get", "e") is own
