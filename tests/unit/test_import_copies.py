"""The Arrow import path moves the body without needless copies, and gives the same bytes:
the gateway's body reader, the SDK's sliced request body, the WAL's vectored write (short
writes included) and the growing segment's reserved buffer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from cluster.spec import CollectionSpec
from cluster.types import ObjectBatch, VectorColumn
from gateway.app import read_body
from gateway.client import SEND_SLICE_BYTES, _Http, sliced_body
from shard import wal as wal_mod
from shard.segment import GROWING_RESERVE_BYTES, GrowingSegment
from shard.wal import WriteAheadLog, encode_upsert


def _echo_app(max_bytes: int) -> Starlette:
    async def echo(request: Request) -> Response:
        body = await read_body(request, max_bytes)
        kind = "buffer" if isinstance(body, memoryview) else "bytes"
        return Response(bytes(body), headers={"x-body": kind})

    return Starlette(routes=[Route("/", echo, methods=["POST"])])


def test_read_body_fills_one_buffer_of_the_declared_length() -> None:
    payload = os.urandom(3 * 2**20 + 17)
    with TestClient(_echo_app(64 * 2**20)) as client:
        resp = client.post("/", content=payload)
        assert resp.content == payload and resp.headers["x-body"] == "buffer"
        # no Content-Length (chunked), or one above the limit: Starlette's reader
        chunked = client.post("/", content=iter([payload[:1000], payload[1000:]]))
        assert chunked.content == payload and chunked.headers["x-body"] == "bytes"
    with TestClient(_echo_app(1024)) as client:
        resp = client.post("/", content=payload)
        assert resp.content == payload and resp.headers["x-body"] == "bytes"


def test_sdk_sends_large_bodies_in_slices_with_their_length() -> None:
    payload = os.urandom(2 * SEND_SLICE_BYTES + 5)
    content, headers = sliced_body(payload)
    assert isinstance(content, list) and len(content) == 3
    assert b"".join(content) == payload and headers == {"content-length": str(len(payload))}
    assert sliced_body(b"small") == (b"small", {})
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    http = _Http(httpx.Client(transport=httpx.MockTransport(handler), base_url="http://x"))
    assert http.request(
        "POST",
        "/v1/c",
        content=payload,
        headers={"content-type": "application/vnd.apache.arrow.stream"},
    ) == {"ok": True}
    (req,) = seen
    assert req.content == payload and req.headers["content-length"] == str(len(payload))
    assert "transfer-encoding" not in req.headers
    assert req.headers["content-type"] == "application/vnd.apache.arrow.stream"


def _batch(n: int, dim: int = 8, seed: int = 0) -> ObjectBatch:
    rng = np.random.default_rng(seed)
    mats = [
        rng.standard_normal((int(rng.integers(1, 6)), dim)).astype(np.float32) for _ in range(n)
    ]
    return ObjectBatch(
        tuple(f"id-{seed}-{i}" for i in range(n)),
        tuple({"i": i} for i in range(n)),
        {"v": VectorColumn.from_matrices(mats, dim)},
    )


def test_wal_writes_the_record_bytes_through_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record is written from the batch's own buffers; a ``pwritev`` that writes only part
    of them (here at most 7 bytes a call) is continued where it stopped."""
    real = os.pwritev
    calls = 0

    def short(fd: int, buffers: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        data = b"".join(bytes(b) for b in buffers)[:7]
        return real(fd, [data], offset)

    monkeypatch.setattr(wal_mod.os, "pwritev", short)
    wal = WriteAheadLog(tmp_path, fsync=True)
    wal.open(0)
    batch = _batch(5)
    wal.append_upsert(batch)
    wal.append_delete(["id-0-1"])
    wal.close()
    monkeypatch.undo()
    assert calls > 10
    data = wal.path(0).read_bytes()
    payload = encode_upsert(batch)
    assert data[12 : 12 + len(payload)] == payload  # the format is the concatenated record
    upsert, delete = WriteAheadLog(tmp_path, fsync=True).replay(0)
    assert upsert.batch is not None and upsert.batch.uuids == batch.uuids
    np.testing.assert_array_equal(upsert.batch.vectors["v"].values, batch.vectors["v"].values)
    assert delete.uuids == ("id-0-1",)


def test_growing_segment_reserves_rows_and_grows_past_them() -> None:
    spec = CollectionSpec.from_dict(
        {"name": "C", "vectors": [{"name": "v", "kind": "multi", "dim": 8, "metric": "dot"}]}
    )
    seg = GrowingSegment(spec, capacity_tokens=20)
    assert seg._buffers["v"].values.shape[0] == 256  # at least 256 rows
    big = GrowingSegment(spec, capacity_tokens=10**12)  # capped: no huge reservation
    assert big._buffers["v"].values.nbytes <= GROWING_RESERVE_BYTES
    batches = [_batch(40, seed=s) for s in range(4)]  # 4 × ~120 rows: past 256
    for b in batches:
        seg.append(b)
    view = seg.view().vectors["v"]
    expected = np.concatenate([b.vectors["v"].values for b in batches])
    np.testing.assert_array_equal(view.tokens, expected)
    assert view.offsets[-1] == len(expected) and seg.n_objects == 160
    np.testing.assert_array_equal(seg.vectors_of(41)["v"], batches[1].vectors["v"].rows(1))
