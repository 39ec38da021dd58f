"""The benchmark harness: seeded data, exact truth, baselines, an end-to-end tiny run, reports.

Checks that the harness works and recall stays above a floor — never speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench import data as bench_data
from bench import main as bench_main
from bench.baselines import BruteForce, gather_rows, ivf_nlist
from bench.data import Dataset, doc_index, doc_uuid
from bench.harness import (
    BenchConfig,
    HttpSearcher,
    Job,
    _run_jobs,
    engine_available,
    measure,
    measure_explain,
)
from bench.report import format_table, summarize, write_all
from bench.truth import exact_scores, ground_truth, recall, top_k
from cluster import vector_wire
from cluster.ids import shard_for_uuid


def _small(
    cache: Path, n_docs: int = 300, n_queries: int = 6, seed: int = 0, noise: float = 0.6
) -> Dataset:
    return bench_data.synthetic(
        "tiny", noise=noise, seed=seed, n_queries=n_queries, cache_dir=cache, n_docs=n_docs
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


# --------------------------------------------------------------------------------------------
# data


def test_synthetic_has_declared_shape(cache: Path) -> None:
    ds = _small(cache)
    assert ds.values.dtype == np.float16 and ds.values.shape == (ds.n_tokens, 128)
    lengths = np.diff(ds.offsets)
    assert ds.n_docs == 300 and lengths.min() >= 16 and lengths.max() <= 64
    assert 26 <= lengths.mean() <= 38  # "≈ 32 tokens per document"
    assert ds.n_queries == 6 and np.all(np.diff(ds.query_offsets) == 32)
    assert ds.query_values.dtype == np.float32
    norms = np.linalg.norm(ds.values.astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    assert np.all((ds.query_targets >= 0) & (ds.query_targets < ds.n_docs))


def test_tiny_size_is_about_2k_docs() -> None:
    spec = bench_data.SIZES["tiny"]
    assert spec.n_docs == 2_000 and spec.dim == 128
    small, medium = bench_data.SIZES["small"], bench_data.SIZES["medium"]
    assert (small.n_docs, medium.n_docs) == (20_000, 200_000)
    lengths = bench_data.doc_lengths(small, np.random.default_rng(0))
    assert abs(lengths.sum() - 640_000) / 640_000 < 0.02  # ≈ 640k tokens


def test_synthetic_is_seeded_and_cached(tmp_path: Path) -> None:
    a = _small(tmp_path / "a")
    b = _small(tmp_path / "b")
    c = _small(tmp_path / "c", seed=1)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.query_values, b.query_values)
    assert not np.array_equal(a.offsets, c.offsets)
    again = _small(tmp_path / "a")  # from the cache, memory-mapped
    assert isinstance(again.values, np.memmap) and np.array_equal(again.values, a.values)
    more = _small(tmp_path / "a", n_queries=9)  # more queries keep the first ones
    assert np.array_equal(more.query_values[: len(a.query_values)], a.query_values)


def test_noise_controls_spread(tmp_path: Path) -> None:
    tight = _small(tmp_path, noise=0.1)
    loose = _small(tmp_path, noise=1.0)

    def best_other(ds: Dataset) -> float:
        x = ds.values[:2000].astype(np.float32)
        sims = x @ x.T
        np.fill_diagonal(sims, -1)
        return float(np.median(sims.max(axis=1)))

    assert best_other(tight) > best_other(loose) + 0.1


def test_stdlib_passages_for_the_real_set() -> None:
    passages, queries, targets = bench_data.stdlib_passages(300)
    assert 300 <= len(passages) < 400 and queries and len(queries) == len(targets)
    assert all(len(p.split()) <= 60 for p in passages)
    assert all(0 <= t < len(passages) for t in targets)
    assert queries[0] not in passages[targets[0]]  # the query sentence is not in its target


def test_minilm_missing_model_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with pytest.raises(bench_data.DatasetUnavailable, match="sentence-transformers"):
        bench_data.minilm(max_docs=10, n_queries=2, cache_dir=tmp_path)
    rc = bench_main(
        [
            "--dataset",
            "minilm",
            "--cache-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--queries",
            "2",
        ]
    )
    assert rc == 2


def test_uuid_roundtrip_and_spread() -> None:
    ids = [doc_uuid(i) for i in range(200)]
    assert [doc_index(u) for u in ids] == list(range(200))
    assert len(set(ids)) == 200
    shards = {shard_for_uuid(u, 2) for u in ids}
    assert shards == {0, 1}


# --------------------------------------------------------------------------------------------
# truth


def _naive_maxsim(ds: Dataset, qi: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    q = ds.query(qi).astype(np.float64)
    return np.array(
        [(q @ ds.doc(d).astype(np.float64).T).max(axis=1).sum() for d in range(ds.n_docs)]
    )


def test_truth_matches_naive_reference(cache: Path) -> None:
    ds = _small(cache)
    scores = exact_scores(ds)
    chunked = exact_scores(ds, chunk_tokens=500)
    assert np.allclose(scores, chunked, atol=1e-4)
    for qi in range(ds.n_queries):
        ref = _naive_maxsim(ds, qi)
        assert np.allclose(scores[qi], ref, atol=1e-3)
    truth = ground_truth(ds, k=20)
    ref_ids, _ = top_k(
        np.stack([_naive_maxsim(ds, q) for q in range(ds.n_queries)]).astype(np.float32), 20
    )
    overlap = np.mean([recall(truth.ids[q], ref_ids[q], 10) for q in range(ds.n_queries)])
    assert overlap == 1.0
    assert np.all(np.diff(truth.scores, axis=1) <= 1e-6)  # best first
    cached = ground_truth(ds, k=20)
    assert np.array_equal(cached.ids, truth.ids)


def test_recall_counts_ties() -> None:
    from bench.truth import GroundTruth

    scores = np.array([[5.0, 4.0, 3.0, 3.0, 1.0]], dtype=np.float32)
    truth = GroundTruth(np.array([[7, 8, 9, 10, 11]]), scores)
    assert truth.recall(0, np.array([7, 8, 10]), 3) == 1.0  # 10 ties 9 at rank 3
    assert truth.recall(0, np.array([7, 8, 11]), 3) == pytest.approx(2 / 3)
    assert recall(np.array([1, 2]), np.array([2, 3]), 2) == 0.5


def test_known_item_target_ranks_high(cache: Path) -> None:
    ds = _small(cache)
    truth = ground_truth(ds)
    hits = [int(ds.query_targets[q]) in truth.ids[q][:10].tolist() for q in range(ds.n_queries)]
    assert np.mean(hits) >= 0.8


# --------------------------------------------------------------------------------------------
# baselines


def test_gather_rows() -> None:
    offsets = np.array([0, 3, 5, 9], dtype=np.int64)
    rows, local = gather_rows(offsets, np.diff(offsets), np.array([2, 0], dtype=np.int64))
    assert rows.tolist() == [5, 6, 7, 8, 0, 1, 2] and local.tolist() == [0, 4, 7]
    assert ivf_nlist(64_000) == 512 and ivf_nlist(640_000) == 2048


def test_bruteforce_is_exact(cache: Path) -> None:
    ds = _small(cache)
    truth = ground_truth(ds)
    res = measure(
        BruteForce(ds, chunk_tokens=1000),
        ds,
        truth,
        list(range(ds.n_queries)),
        warmup=1,
        concurrency=2,
    )
    assert res["recall_at_10"] == 1.0 and res["recall_at_100"] == 1.0
    assert res["recall_at_10_2_clients"] == 1.0 and res["candidates_mean"] == ds.n_docs


def test_faiss_rerank_recall_floor(cache: Path) -> None:
    pytest.importorskip("faiss")
    from bench.baselines import FaissConfig, FaissTokenAnn

    ds = _small(cache)
    truth = ground_truth(ds)
    ann = FaissTokenAnn(ds, "ivf")
    ann.configure(FaissConfig("ivf", 64, nprobe=16))
    res = measure(ann, ds, truth, list(range(ds.n_queries)), warmup=0, concurrency=1)
    assert res["recall_at_10"] >= 0.9
    assert 0 < res["candidates_mean"] <= ds.n_docs
    assert set(res["phase_ms"]) == {"ann", "gather", "maxsim"}


# --------------------------------------------------------------------------------------------
# HTTP client against a fake gateway (MockTransport): the wire shapes the harness uses


class _FakeGateway:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.docs: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
        self.collections: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        if path == "/v1/collections":
            self.collections.append(body)
            return httpx.Response(200, json=body)
        if path.endswith("/objects"):
            for o in body["objects"]:
                self.docs[o["id"]] = np.asarray(o["vectors"]["v"], dtype=np.float32)
            return httpx.Response(
                200,
                json={
                    "results": [
                        {"id": o["id"], "status": "SUCCESS", "error": None} for o in body["objects"]
                    ]
                },
            )
        if path.endswith("/query"):
            raw = body["near_vector"]["vector"]  # the binary form, as the harness sends it
            q = vector_wire.decode(raw, "near_vector.vector")
            scored = sorted(
                ((float((q @ d.T).max(axis=1).sum()), u) for u, d in self.docs.items()),
                reverse=True,
            )[: body["limit"]]
            explain = "explain" in body.get("return_metadata", [])
            return httpx.Response(
                200,
                json={
                    "objects": [
                        {
                            "id": u,
                            "metadata": {
                                "score": s,
                                **({"explain": self.explain(q, u)} if explain else {}),
                            },
                        }
                        for s, u in scored
                    ]
                },
            )
        return httpx.Response(404, json={"error": {"code": "not_found"}})

    def explain(self, q: np.ndarray[Any, np.dtype[np.float32]], uuid: str) -> dict[str, Any]:
        sims = self.docs[uuid] @ q.T  # what the engine's maxsim_explain returns
        return {
            "tokens": [
                {"query_token": i, "doc_token": int(j), "sim": float(sims[j, i])}
                for i, j in enumerate(sims.argmax(axis=0))
            ]
        }


def test_http_searcher_wire_shapes(cache: Path) -> None:
    ds = _small(cache, n_docs=120)
    truth = ground_truth(ds)
    fake = _FakeGateway(ds.dim)
    searcher = HttpSearcher(
        "http://bench.test",
        client_factory=lambda: httpx.Client(transport=httpx.MockTransport(fake)),
    )
    searcher.create(ds.dim, 2)
    assert fake.collections[0]["vectors"][0] == {
        "name": "v",
        "kind": "multi",
        "dim": 128,
        "metric": "dot",
        "dtype": "float32",
    }
    spent, failed = searcher.import_dataset(ds, batch_docs=50)
    assert failed == 0 and len(fake.docs) == ds.n_docs and spent > 0
    res = measure(searcher, ds, truth, list(range(ds.n_queries)), warmup=0, concurrency=2)
    assert res["recall_at_10"] >= 0.99 and res["recall_at_10_2_clients"] >= 0.99
    ex = measure_explain(searcher, ds, list(range(ds.n_queries)), k=5, warmup=0)
    assert ex["hits_checked"] == 5 * ds.n_queries and ex["score_mismatches"] == 0
    assert ex["p50_ms_on"] > 0 and ex["p50_ms_off"] > 0
    assert ex["example"]["query"] == 0 and len(ex["example"]["tokens"]) == 5


def test_http_searcher_queries_over_keep_alive_http_client() -> None:
    """Without an injected client, queries go over the standard library's http.client on one
    kept-alive connection, reconnect once when the server closed it, and raise on 4xx."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, int]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append((self.path, self.client_address[1]))
            status, out = (
                200,
                {"objects": [{"id": doc_uuid(7), "metadata": {"score": 1.0}}], "took_ms": 1.5},
            )
            if body["limit"] == 99:
                status, out = 422, {"error": {"code": "invalid_input"}}
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            if len(seen) == 2:
                self.send_header("connection", "close")  # the next query must reconnect
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        searcher = HttpSearcher(f"http://127.0.0.1:{server.server_address[1]}")
        q = np.ones((2, 4), dtype=np.float32)
        for _ in range(3):
            out = searcher.search(q, 10)
            assert out.doc_ids.tolist() == [7] and out.timings_s == {"server": 0.0015}
        assert [p for p, _ in seen] == ["/v1/collections/Bench/query"] * 3
        assert seen[0][1] == seen[1][1] != seen[2][1]  # kept alive, then a new connection
        with pytest.raises(RuntimeError, match="HTTP 422"):
            searcher.search(q, 99)
    finally:
        server.shutdown()
        server.server_close()


def test_explain_check_counts_mismatches(cache: Path) -> None:
    """A hit whose token similarities do not add up to its score, or that lacks a query
    token, is counted."""
    from bench.harness import ExplainedHit

    ds = _small(cache, n_docs=120)
    n_q = len(ds.query(0))

    class Wrong:
        def search_hits(self, query: Any, k: int, explain: bool) -> list[ExplainedHit]:
            tokens = [{"query_token": i, "doc_token": 0, "sim": 0.5} for i in range(n_q)]
            return [
                ExplainedHit(1, 0.5 * n_q, tokens if explain else None),  # right
                ExplainedHit(2, 0.5 * n_q + 0.1, tokens if explain else None),  # off
                ExplainedHit(3, 0.5 * (n_q - 1), tokens[1:] if explain else None),
            ]

    ex = measure_explain(Wrong(), ds, [0, 1], warmup=0)
    assert ex["hits_checked"] == 6 and ex["score_mismatches"] == 4

    class Broken:
        def search_hits(self, query: Any, k: int, explain: bool) -> list[ExplainedHit]:
            raise RuntimeError("HTTP 422")

    from bench.harness import _explain_or_error
    from bench.report import _explain_lines

    err = _explain_or_error(Broken(), ds, [0], repeat=1)
    assert "HTTP 422" in err["error"]
    lines = _explain_lines([{"pipeline": "p", "explain": err}, {"pipeline": "q", "explain": ex}])
    assert lines[0].startswith("explain (p): error") and "4 mismatches" in lines[1]


# --------------------------------------------------------------------------------------------
# end to end: `colshard bench --size tiny` in-process, then the report files


@pytest.fixture(scope="module")
def tiny_run(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-out")
    rc = bench_main(
        [
            "--size",
            "tiny",
            "--queries",
            "8",
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--faiss",
            "ivf",
            "--no-isolate",
            "--bruteforce-queries",
            "4",
            # small segments, so the engine's token-index path runs on 64k tokens
            "--engine-setting",
            "seal_threshold_tokens=16384",
            "--engine-setting",
            "brute_force_max_tokens=8192",
            "--engine-kprime",
            "32",
        ]
    )
    assert rc == 0
    doc: dict[str, Any] = json.loads((out / "results.json").read_text())
    doc["_out"] = str(out)
    return doc


def test_tiny_run_writes_reports(tiny_run: dict[str, Any]) -> None:
    out = Path(tiny_run["_out"])
    assert (out / "results.txt").read_text().startswith("dataset synthetic-v1-tiny")
    png = out / "qps_recall.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tiny_run["dataset"]["n_docs"] == 2000 and tiny_run["dataset"]["n_queries"] == 8
    assert {"environment", "summary", "config"} <= set(tiny_run)


def test_tiny_run_recall_floors(tiny_run: dict[str, Any]) -> None:
    by_family: dict[str, list[dict[str, Any]]] = {}
    for r in tiny_run["results"]:
        assert "error" not in r, r
        by_family.setdefault(r["family"], []).append(r)
    assert by_family["bruteforce"][0]["recall_at_10"] == 1.0
    ivf = by_family["faiss-ivf"]
    assert max(r["recall_at_10"] for r in ivf) >= 0.9
    assert all(r["peak_rss_mb"] > 0 and r["build_s"] > 0 for r in ivf)
    assert tiny_run["summary"]["best_faiss"] is not None


def test_tiny_run_engine(tiny_run: dict[str, Any]) -> None:
    engine = next(r for r in tiny_run["results"] if r["family"] == "colshard")
    if "skipped" in engine:
        pytest.skip(f"engine part skipped: {engine['skipped']}")
    assert engine["recall_at_10"] >= 0.8  # a floor, not the target (0.95 on small)
    assert engine["import_failed"] == 0 and engine["import_tokens_per_s"] > 0
    assert engine["reopen_recall_at_10"] >= 0.8
    assert 0 < engine["candidates_mean"] < 2000  # pruned by the token index
    assert engine["index_disk_bytes_per_token"] > 0
    sweep = [r for r in tiny_run["results"] if r["family"] == "colshard-sweep"]
    assert len(sweep) == 1 and sweep[0]["recall_at_10"] >= 0.8
    # calibrated on synthetic queries after the import, then again on 128 warm-up queries
    # that are not the measured ones
    first = engine["calibration"]["shards"][0]["v"]
    warm = engine["calibration_warm"]["shards"][0]["v"]
    assert first["state"] == warm["state"] == "calibrated"
    assert first["measured"]["real_queries"] == 0 and warm["measured"]["real_queries"] == 128
    assert engine["calibration"]["cpu_s"] > 0
    synthetic = [r for r in tiny_run["results"] if r["family"] == "colshard-calibration"]
    assert len(synthetic) == 1 and synthetic[0]["recall_at_10"] >= 0.8


@pytest.mark.parametrize("name", sorted(bench_data.GENERATORS))
def test_generators_have_their_declared_shape(tmp_path: Path, name: str) -> None:
    spec = bench_data.GENERATORS[name]
    n_docs = 120 if name == "colpali" else 600
    ds = bench_data.generated(name, n_queries=5, cache_dir=tmp_path, n_docs=n_docs)
    lengths = np.diff(ds.offsets)
    assert ds.dim == spec.dim and ds.n_docs == n_docs and ds.n_queries == 5
    assert lengths.max() <= spec.max_len and lengths.min() >= 1
    assert np.allclose(np.linalg.norm(ds.values[:500].astype(np.float32), axis=1), 1, atol=1e-2)
    q_lengths = np.diff(ds.query_offsets)
    assert q_lengths.min() >= spec.q_min and q_lengths.max() <= spec.q_max
    if name == "colpali":
        assert 1_000 <= lengths.mean() <= 1_060
    elif spec.len_sigma >= 0.8:  # long-tailed: the longest far above the median
        assert lengths.max() > 4 * np.median(lengths)
    # seeded and cached: the same numbers again, and more queries keep the first ones
    again = bench_data.generated(name, n_queries=8, cache_dir=tmp_path, n_docs=n_docs)
    assert np.array_equal(again.values, ds.values)
    assert np.array_equal(again.query_values[: len(ds.query_values)], ds.query_values)
    if spec.anisotropy > 0:  # a few directions carry most of the variance
        x = ds.values[:5_000].astype(np.float32)
        ev = np.linalg.eigvalsh(np.cov((x - x.mean(0)).T))[::-1]
        assert ev[: spec.dim // 8].sum() / ev.sum() > 0.3


def test_tiny_run_explain(tiny_run: dict[str, Any]) -> None:
    """The engine run measures explain on vs off, checks every hit's explain against its
    score, and keeps one example (results.json and the text report)."""
    engine = next(r for r in tiny_run["results"] if r["family"] == "colshard")
    if "skipped" in engine:
        pytest.skip(f"engine part skipped: {engine['skipped']}")
    ex = engine["explain"]
    assert ex["p50_ms_off"] > 0 and ex["p50_ms_on"] > 0 and ex["overhead_p50_ms"] is not None
    assert ex["hits_checked"] == 10 * tiny_run["dataset"]["n_queries"]
    assert ex["score_mismatches"] == 0
    example = ex["example"]
    assert example["query"] == 0 and example["n_query_tokens"] == 32
    assert len(example["tokens"]) == 5 and all(
        {"query_token", "doc_token", "sim"} <= set(t) for t in example["tokens"]
    )
    assert tiny_run["summary"]["explain"][engine["pipeline"]]["score_mismatches"] == 0
    text = (Path(tiny_run["_out"]) / "results.txt").read_text()
    assert f"explain ({engine['pipeline']})" in text and "0 mismatches" in text


class _FakeEngine:
    """Exact MaxSim over what it was given: enough to check routing and the merge."""

    def __init__(self, spec: Any, shard: int, data_dir: Path, settings: Any) -> None:
        self.shard = shard
        self.docs: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}

    def upsert(self, batch: Any) -> list[Any]:
        from cluster.types import WriteResult

        col = batch.vectors["v"]
        for i, u in enumerate(batch.uuids):
            self.docs[u] = col.rows(i)
        return [WriteResult(u, True) for u in batch.uuids]

    def search(self, req: Any) -> Any:
        from cluster.types import Hit, ShardSearchResult

        scored = sorted(
            ((-float((req.query @ d.T).max(axis=1).sum()), u) for u, d in self.docs.items())
        )[: req.k]
        return ShardSearchResult(
            self.shard, tuple(Hit(u, -s) for s, u in scored), len(self.docs), len(self.docs)
        )

    def close(self) -> None:
        pass


def test_sharded_engine_routes_and_merges(cache: Path, tmp_path: Path) -> None:
    from bench.harness import EngineSearcher, ShardedEngine, collection_dict, object_batch
    from cluster.spec import CollectionSpec

    ds = _small(cache)
    truth = ground_truth(ds)
    spec = CollectionSpec.from_dict(collection_dict(ds.dim, 2))
    engine = ShardedEngine(_FakeEngine, spec, tmp_path, None)
    assert engine.index_bytes() is None
    results = engine.upsert(object_batch(ds, 0, ds.n_docs))
    assert len(results) == ds.n_docs and all(r.ok for r in results)
    sizes = [len(e.docs) for e in engine.shards]
    assert sum(sizes) == ds.n_docs and min(sizes) > 0.3 * ds.n_docs
    res = measure(EngineSearcher(engine), ds, truth, list(range(ds.n_queries)), warmup=0)
    assert res["recall_at_10"] == 1.0 and res["candidates_mean"] == ds.n_docs
    engine.close()


def test_engine_skip_reason_is_stated() -> None:
    why = engine_available()
    assert why is None or "engine" in why


def test_isolated_job_runs_in_a_child_process(cache: Path) -> None:
    ds = _small(cache)
    ground_truth(ds)
    assert ds.path is not None
    cfg = BenchConfig(n_queries=ds.n_queries, isolate=True, warmup=0, max_bruteforce_queries=3)
    [rec] = _run_jobs([Job("bruteforce", str(ds.path), cfg)], isolate=True, log=lambda _: None)
    assert rec["recall_at_10"] == 1.0 and rec["isolated_process"] and rec["peak_rss_mb"] > 0


def test_report_from_synthetic_results(tmp_path: Path) -> None:
    def rec(family: str, name: str, r10: float, qps: float, **kw: Any) -> dict[str, Any]:
        return {
            "family": family,
            "pipeline": name,
            "recall_at_10": r10,
            "qps_1": qps,
            "p50_ms": 1000 / qps,
            "candidates_mean": 100.0,
            "build_s": 10.0,
            **kw,
        }

    doc: dict[str, Any] = {
        "config": {"size": "small", "threads": 1},
        "dataset": {"key": "x", "n_docs": 1, "n_tokens": 1},
        "results": [
            rec("faiss-hnsw", "faiss-hnsw a", 0.85, 100.0),
            rec("faiss-hnsw", "faiss-hnsw b", 0.93, 40.0, qps_2=70.0),
            rec("faiss-ivf", "faiss-ivf a", 0.95, 30.0),
            rec(
                "colshard", "colshard-engine", 0.96, 130.0, index_bytes_per_token=30.0, build_s=5.0
            ),
            rec("colshard-http", "colshard-http", 0.96, 100.0),
            {"family": "bruteforce", "pipeline": "numpy-bruteforce", "skipped": "test"},
        ],
    }
    doc["summary"] = summarize(doc)
    s = doc["summary"]
    assert s["best_faiss"]["pipeline"] == "faiss-hnsw b"
    assert s["ratios"]["engine_qps_vs_best_faiss"] == pytest.approx(130 / 40)
    assert s["ratios"]["engine_build_vs_faiss_ivf"] == pytest.approx(0.5)
    assert s["ratios"]["http_p50_overhead_ms"] == pytest.approx(10.0 - 1000 / 130)
    passed = {t["target"]: t["pass"] for t in s["targets"]}
    assert passed["engine QPS ≥ 3× best faiss (recall@10 ≥ 0.90)"] is True
    assert passed["HTTP adds ≤ 3 ms p50"] is True
    files = write_all(doc, tmp_path)
    assert set(files) == {"json", "table", "plot"}
    assert "numpy-bruteforce: skipped (test)" in format_table(doc)


def test_kprime_sweep_parses_optional_rerank() -> None:
    from bench.__main__ import parse_kprime_sweep

    assert parse_kprime_sweep("384, 512/200,") == ((384, None), (512, 200))
    assert parse_kprime_sweep("") == ()
    with pytest.raises(SystemExit):
        parse_kprime_sweep("384/x")


def test_float16_engine_run_stores_half_the_bytes(cache: Path) -> None:
    """`--dtype float16`: the engine's collection stores float16 tokens (half the disk of a
    float32 run over the same data) and still finds the exact top 10 of this small set."""
    from bench.__main__ import build_parser, config_from_args
    from bench.harness import _job_engine

    assert config_from_args(build_parser().parse_args(["--dtype", "float16"])).dtype == "float16"
    ds = _small(cache, n_docs=400, n_queries=6)
    truth = ground_truth(ds)
    records = {}
    for dtype in ("float32", "float16"):
        cfg = BenchConfig(n_queries=ds.n_queries, warmup=0, dtype=dtype, isolate=False)
        [records[dtype], *_] = _job_engine(ds, truth, cfg)
    f16, f32 = records["float16"], records["float32"]
    assert "skipped" not in f16 and f16["pipeline"] == "colshard-engine float16"
    assert f16["params"]["dtype"] == "float16" and f32["params"]["dtype"] == "float32"
    assert f16["recall_at_10"] == f32["recall_at_10"] == 1.0  # scored exactly at this size
    assert f16["disk_bytes_per_token"] < 0.7 * f32["disk_bytes_per_token"]
