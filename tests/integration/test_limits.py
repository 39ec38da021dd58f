"""Request limits on a real gateway: each one answers a clear 4xx naming the limit; a
coordinator that does not answer in time gives 504; the defaults take long multi-vectors."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest

from tests.integration.conftest import Server
from tests.integration.gateways import extra_gateway

pytestmark = pytest.mark.integration

ARROW = "application/vnd.apache.arrow.stream"


def mat(n: int, dim: int = 4) -> list[list[float]]:
    return np.round(np.random.default_rng(n).normal(size=(n, dim)), 3).tolist()


def obj(n_tokens: int) -> dict[str, Any]:
    return {"properties": {"text": "x"}, "vectors": {"mv": mat(n_tokens)}}


def leaf(i: int = 0) -> dict[str, Any]:
    return {"path": "year", "operator": "equal", "value": i}


def nest(depth: int) -> dict[str, Any]:
    node = leaf()
    for _ in range(depth - 1):
        node = {"operator": "not", "operands": [node]}
    return node


@pytest.fixture(scope="module")
def limited(colshard_server: Server) -> Iterator[httpx.Client]:
    settings = replace(
        colshard_server.settings,
        max_batch_objects=5,
        max_tokens_per_object=8,
        max_query_tokens=4,
        max_dim=16,
        max_limit=50,
        max_filter_depth=3,
        max_filter_nodes=10,
        max_shards=2,
        max_body_bytes=64 * 1024,
    )
    with (
        extra_gateway(settings, colshard_server.handle) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        r = http.post(
            "/v1/collections",
            json={
                "name": "Lim",
                "properties": [
                    {"name": "text", "data_type": "text"},
                    {"name": "year", "data_type": "int"},
                ],
                "vectors": [{"name": "mv", "dim": 4}],
                "shard_count": 2,
            },
        )
        assert r.status_code == 201, r.text
        yield http


def assert_limit(r: httpx.Response, status: int, limit: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["details"]["limit"] == limit, r.text


def test_collection_limits(limited: httpx.Client) -> None:
    base = {"name": "LimX", "vectors": [{"name": "mv", "dim": 4}]}
    assert_limit(
        limited.post("/v1/collections", json={**base, "shard_count": 3}), 422, "max_shards"
    )
    assert_limit(
        limited.post("/v1/collections", json={**base, "vectors": [{"name": "mv", "dim": 17}]}),
        422,
        "max_dim",
    )


def test_batch_and_token_limits(limited: httpx.Client) -> None:
    r = limited.post("/v1/collections/Lim/objects", json={"objects": [obj(2)] * 6})
    assert_limit(r, 413, "max_batch_objects")
    assert r.json()["error"]["code"] == "payload_too_large"
    table = pa.table(
        {"id": [str(uuid.uuid4()) for _ in range(6)], "mv": [mat(2) for _ in range(6)]}
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    r = limited.post(
        "/v1/collections/Lim/objects", content=sink.getvalue(), headers={"content-type": ARROW}
    )
    assert_limit(r, 413, "max_batch_objects")
    r = limited.post("/v1/collections/Lim/objects", json={"objects": [obj(2), obj(9)]})
    assert_limit(r, 422, "tokens")
    assert "objects[1].vectors.mv: 9 tokens exceed the limit of 8" in r.json()["error"]["message"]
    r = limited.put(f"/v1/collections/Lim/objects/{uuid.uuid4()}", json=obj(9))
    assert_limit(r, 422, "tokens")
    r = limited.post("/v1/collections/Lim/objects", json={"objects": [obj(8)] * 5})
    assert r.status_code == 200 and r.json()["n_ok"] == 5, r.text


def test_query_limits(limited: httpx.Client) -> None:
    q = "/v1/collections/Lim/query"
    assert_limit(limited.post(q, json={"near_vector": {"vector": mat(5)}}), 422, "tokens")
    assert limited.post(q, json={"near_vector": {"vector": mat(4)}}).status_code == 200
    assert_limit(limited.post(q, json={"hybrid": {"query": "x", "vector": mat(5)}}), 422, "tokens")
    assert_limit(limited.post(q, json={"near_vector": {"vector": [[0.0] * 17]}}), 422, "max_dim")
    assert_limit(limited.post(q, json={"bm25": {"query": "x"}, "limit": 51}), 422, "max_limit")
    assert_limit(limited.post(q, json={"bm25": {"query": "x"}, "offset": 51}), 422, "max_limit")
    assert (
        limited.post(q, json={"bm25": {"query": "x"}, "limit": 50, "offset": 50}).status_code == 200
    )
    r = limited.get("/v1/collections/Lim/objects", params={"limit": 51})
    assert r.status_code == 422, r.text


def test_filter_limits(limited: httpx.Client) -> None:
    q = "/v1/collections/Lim/query"
    ok = limited.post(q, json={"bm25": {"query": "x"}, "filters": nest(3)})
    assert ok.status_code == 200, ok.text
    assert_limit(
        limited.post(q, json={"bm25": {"query": "x"}, "filters": nest(4)}), 422, "max_filter_depth"
    )
    wide = {"operator": "or", "operands": [leaf(i) for i in range(10)]}
    assert_limit(
        limited.post(q, json={"bm25": {"query": "x"}, "filters": wide}), 422, "max_filter_nodes"
    )
    values = {"path": "year", "operator": "contains_any", "value": list(range(20))}
    assert_limit(
        limited.post(
            "/v1/collections/Lim/objects/delete", json={"filters": values, "dry_run": True}
        ),
        422,
        "max_filter_nodes",
    )


def test_body_limit(limited: httpx.Client) -> None:
    r = limited.post(
        "/v1/collections/Lim/objects",
        json={"objects": [{"properties": {"text": "y" * 70_000}, "vectors": {"mv": mat(1)}}]},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text


def test_coordinator_timeout_is_504(colshard_server: Server) -> None:
    settings = replace(colshard_server.settings, query_timeout_s=1e-6)
    with extra_gateway(settings, colshard_server.handle) as url:
        r = httpx.get(f"{url}/v1/collections", timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"


def test_defaults_take_long_multivectors(colshard_server: Server) -> None:
    """No low cap on tokens per object: 20,000 tokens in one object go in and come back."""
    with httpx.Client(base_url=colshard_server.url, timeout=120) as http:
        r = http.post(
            "/v1/collections",
            json={
                "name": "LimLong",
                "vectors": [{"name": "mv", "dim": 2, "metric": "dot"}],
                "shard_count": 1,
            },
        )
        assert r.status_code == 201, r.text
        oid = str(uuid.uuid4())
        long = np.random.default_rng(1).normal(size=(20_000, 2)).round(3)
        r = http.put(
            f"/v1/collections/LimLong/objects/{oid}", json={"vectors": {"mv": long.tolist()}}
        )
        assert r.status_code == 200, r.text
        got = http.get(
            f"/v1/collections/LimLong/objects/{oid}", params={"include_vector": "true"}
        ).json()
        assert np.asarray(got["vectors"]["mv"]).shape == (20_000, 2)
        http.delete("/v1/collections/LimLong")
