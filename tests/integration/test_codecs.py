"""Lossy token codecs end to end: collections created over HTTP with an int8 and a residual
codec, imported past the seal threshold, fetched and searched through the real gateway,
coordinator and shard actors."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import numpy as np

from gateway.client import Client, NamedVector
from tests.integration.conftest import Server

DIM, N_DOCS = 32, 400


def _docs(rng: np.random.Generator) -> list[np.ndarray]:
    centres = rng.standard_normal((30, DIM)).astype(np.float32)
    out = []
    for _ in range(N_DOCS):
        m = int(rng.integers(12, 30))
        t = centres[rng.integers(0, 30, m)] + 0.4 * rng.standard_normal((m, DIM))
        out.append((t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32))
    return out


def _fetch(url: str, name: str, oid: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/collections/{name}/objects/{oid}", params={"include_vector": True})
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def test_codecs_over_http(colshard_server: Server) -> None:
    url = colshard_server.url
    rng = np.random.default_rng(8)
    docs = _docs(rng)
    ids = [str(uuid.uuid4()) for _ in docs]
    codecs: dict[str, Any] = {
        "CodecInt8": "int8",
        "CodecResidual": {"kind": "residual", "bits": 2, "originals": False},
    }
    with Client(url) as client:
        for name, codec in codecs.items():
            col = client.collections.create(
                name, properties=[], shard_count=1, vectors=[NamedVector("v", dim=DIM, codec=codec)]
            )
            spec = httpx.get(f"{url}/v1/collections/{name}").json()
            kind = codec if isinstance(codec, str) else codec["kind"]
            assert spec["vectors"][0]["codec"]["kind"] == kind
            for s in range(0, N_DOCS, 100):
                col.data.insert_many(
                    [{"id": ids[i], "vectors": {"v": docs[i]}} for i in range(s, s + 100)]
                )
        # ~8k tokens: past the fixture's 4,096-token seal threshold, so most objects end up in
        # sealed (coded) segments; the residual collection keeps no originals, so its fetch
        # says when a vector is decoded
        deadline = time.monotonic() + 60
        while not _fetch(url, "CodecResidual", ids[0]).get("vectors_lossy"):
            assert time.monotonic() < deadline, "the first objects were never sealed"
            time.sleep(0.2)
        lossy = _fetch(url, "CodecResidual", ids[0])
        assert lossy["vectors_lossy"] == ["v"]
        got = np.asarray(lossy["vectors"]["v"], dtype=np.float32)
        assert got.shape == docs[0].shape and not np.array_equal(got, docs[0])
        kept = _fetch(url, "CodecInt8", ids[0])  # int8 keeps the originals: as written
        assert "vectors_lossy" not in kept
        np.testing.assert_allclose(np.asarray(kept["vectors"]["v"]), docs[0], rtol=1e-6)
        for name in codecs:
            col = client.collections.get(name)
            hits = 0
            for i in range(0, N_DOCS, 40):
                q = docs[i][:8] + 0.05 * rng.standard_normal((min(8, len(docs[i])), DIM))
                res = col.query.near_vector(q.astype(np.float32), limit=3)
                hits += res.objects[0].uuid == ids[i]
            assert hits >= 9, (name, hits)  # of 10 known-item queries
            client.collections.delete(name)


def test_pooling_over_http(colshard_server: Server) -> None:
    url = colshard_server.url
    rng = np.random.default_rng(9)
    docs = _docs(rng)[:60]
    ids = [str(uuid.uuid4()) for _ in docs]
    with Client(url) as client:
        col = client.collections.create(
            "Pooled",
            properties=[],
            shard_count=2,
            replication_factor=1,
            vectors=[NamedVector("v", dim=DIM, pooling={"factor": 2})],
        )
        col.data.insert_many(
            [{"id": i, "vectors": {"v": d}} for i, d in zip(ids, docs, strict=True)]
        )
        for i in (0, 7, 31):
            stored = np.asarray(_fetch(url, "Pooled", ids[i])["vectors"]["v"])
            assert stored.shape == (-(-len(docs[i]) // 2), DIM)  # ceil(n / 2) cluster means
            np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, rtol=1e-5)
        hits = sum(
            col.query.near_vector(docs[i][:8], limit=1).objects[0].uuid == ids[i]
            for i in range(0, 60, 6)
        )
        assert hits >= 9
        client.collections.delete("Pooled")
