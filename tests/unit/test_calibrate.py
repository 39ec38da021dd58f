"""Recall calibration (shard.calibrate) and the engine's use of it: the depth search, the
margin, the reservoir, persistence and reload, and the measured recall against numpy MaxSim."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster import recall as rc
from cluster.errors import InvalidInput
from cluster.types import VectorSearch
from shard import calibrate as cal
from shard.engine import ShardEngine
from shard.manifest import CALIBRATION_FILE
from tests.unit.test_shard_support import (
    batch,
    clustered_docs,
    drain,
    exact_top,
    make_spec,
    open_engine,
    uid,
)

# ---------------------------------------------------------------- the pieces


def test_recall_counts_ties_at_the_cut_and_short_truths() -> None:
    truth = [5.0, 4.0, 3.0]
    assert rc.recall_at([5.0, 4.0, 3.0], truth, 3) == 1.0
    assert rc.recall_at([5.0, 4.0, 2.0], truth, 3) == pytest.approx(2 / 3)
    # a different object with the k-th score (an exact duplicate) is not a miss
    assert rc.recall_at([5.0, 3.0, 3.0], truth, 3) == 1.0
    assert rc.recall_at([], [], 10) == 1.0  # nothing eligible
    assert rc.recall_at([9.0], [9.0], 10) == 1.0  # fewer than k eligible: all found
    assert rc.recall_at([], [1.0, 0.5], 10) == 0.0


def test_interval_is_a_one_sided_normal_bound() -> None:
    r = [1.0] * 90 + [0.5] * 10
    mean, low, high = rc.interval(r)
    se = np.std(r, ddof=1) / np.sqrt(len(r))
    assert mean == pytest.approx(0.95)
    assert low == pytest.approx(0.95 - rc.Z_LOWER * se)
    assert high == pytest.approx(0.95 + rc.Z_LOWER * se)
    assert rc.interval([0.7]) == (0.7, 0.0, 1.0)  # one query proves nothing


def _monotone(recall_of_depth: dict[float, float], n: int = 200) -> tuple[Any, list[float]]:
    """An evaluator with the given mean recall per depth (every query the same: no spread)."""
    asked: list[float] = []

    def evaluate(d: float) -> list[float]:
        asked.append(d)
        return [recall_of_depth[d]] * n

    return evaluate, asked


def test_choose_depth_takes_the_cheapest_depth_that_meets_the_target() -> None:
    means = {d: min(1.0, 0.801 + 0.05 * i) for i, d in enumerate(cal.DEPTHS)}
    evaluate, asked = _monotone(means)
    depth, recalls, met, tried = cal.choose_depth(evaluate, 0.95)
    assert met and depth == cal.DEPTHS[3]  # 0.80 + 0.15
    assert recalls == [pytest.approx(0.951)] * 200
    # from 1.0 down while it still meets the target, one rung past: nothing deeper evaluated
    assert asked == [1.0, cal.DEPTHS[3], cal.DEPTHS[2]]
    assert set(tried) == set(asked)


def test_choose_depth_climbs_only_as_far_as_needed() -> None:
    means = {d: (0.9 if d < 2.8 else 0.97) for d in cal.DEPTHS}
    evaluate, asked = _monotone(means)
    depth, _, met, _ = cal.choose_depth(evaluate, 0.95)
    assert met and depth == 2.8
    assert asked == [1.0, 1.4, 2.0, 2.8]  # never the costly 4 .. 16


def test_choose_depth_says_when_no_depth_meets_the_target() -> None:
    evaluate, asked = _monotone(dict.fromkeys(cal.DEPTHS, 0.5))
    depth, _, met, _ = cal.choose_depth(evaluate, 0.95)
    assert not met and depth == cal.DEPTHS[-1]
    assert asked == [d for d in cal.DEPTHS if d >= 1.0]


def test_the_margin_asks_for_more_than_a_mean_at_the_target() -> None:
    """A mean of exactly the target with sampling spread does not pass: its lower bound must."""
    spread = np.where(np.arange(128) % 2 == 0, 0.05, -0.05)

    def evaluate(d: float) -> list[float]:
        return list((0.95 if d < 2.0 else 0.98) + spread)

    depth, recalls, met, tried = cal.choose_depth(evaluate, 0.95)
    assert met and depth == 2.0
    assert tried[1.4] == pytest.approx(0.95)  # the mean was there, the bound was not
    assert rc.interval(recalls)[1] >= 0.95
    # with no spread the same mean passes at once, and shallower depths are tried
    evaluate2, _ = _monotone(dict.fromkeys(cal.DEPTHS, 0.951))
    assert cal.choose_depth(evaluate2, 0.95)[0] == cal.DEPTHS[0]


def test_reservoir_keeps_a_bounded_uniform_sample_of_copies() -> None:
    r = cal.Reservoir(size=50, seed=1)
    rng = np.random.default_rng(2)
    q = np.ones((3, 4), dtype=np.float32)
    r.offer(q)
    q[:] = 7  # the reservoir kept a copy
    for i in range(1, 5_000):
        r.offer(np.full((i % 9 + 1, 4), i, dtype=np.float32))
    assert len(r) == 50
    kept = [float(m[0, 0]) for m in r.sample(50, rng)]
    assert 7.0 not in kept
    # uniform over the 5,000 offered: the kept items' mean index is near the middle
    assert 1_500 < np.mean(kept) < 3_500
    assert len(r.sample(10, rng)) == 10
    assert sorted(r.lengths()) == sorted(len(m) for m in r.sample(50, rng))


def test_synthetic_queries_come_from_stored_objects() -> None:
    rng = np.random.default_rng(3)
    docs = clustered_docs(rng, 40, 16)
    tokens = np.concatenate(docs)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    sampler = cal.DocSampler([(tokens, offsets, np.arange(0, 40, 2, dtype=np.int64))])
    assert sampler.n_docs == 20
    qs = cal.synthetic_queries(sampler, 200, rng, cosine=True)
    assert len(qs) == 200
    lengths = [len(q) for q in qs]
    assert min(lengths) >= cal.SYNTH_MIN_LEN and max(lengths) <= cal.SYNTH_MAX_LEN
    assert all(np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5) for q in qs)
    # each query token is near some token of a live (even-numbered) object
    live = np.concatenate(docs[0::2])
    best = max(float((qs[0] @ live.T).max(axis=1).min()), 0)
    assert best > 0.5
    assert [len(q) for q in cal.synthetic_queries(sampler, 5, rng, cosine=False, lengths=[7])] == [
        7
    ] * 5
    assert cal.synthetic_queries(cal.DocSampler([]), 5, rng, cosine=True) == []


def test_spec_validates_the_recall_options() -> None:
    def spec(kind: str, **opts: Any) -> Any:
        return make_spec(
            [{"name": "v", "kind": "multi", "dim": 8, "index": {"kind": kind, "options": opts}}]
        )

    assert (
        spec("scann", target_recall=0.99, recall_k=100).vectors[0].index.options["target_recall"]
        == 0.99
    )
    spec("muvera", target_recall=0.9)
    for bad in (
        {"target_recall": 1.5},
        {"target_recall": "high"},
        {"target_recall": True},
        {"recall_k": 50},
        {"recall_k": True},
    ):
        with pytest.raises(InvalidInput):
            spec("scann", **bad)
    with pytest.raises(InvalidInput, match="flat"):
        spec("flat", target_recall=0.9)


# ---------------------------------------------------------------- the engine

DIM = 24
N_DOCS = 1_500


def _settings(**kw: Any) -> dict[str, Any]:
    base = {
        "seal_threshold_tokens": 200_000,
        "brute_force_max_tokens": 2_000,
        "candidates_per_token": 64,
        "rerank_docs": 60,
        "calibration_queries": 48,
        "calibration_duty": 1.0,
        # idle 50 ms after a write: shards calibrate once writes settle
        "seal_idle_s": 0.05,
        "index_defer_tokens": 0,
    }
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def corpus() -> list[np.ndarray]:
    return clustered_docs(np.random.default_rng(11), N_DOCS, DIM, min_len=4)


def _indexed_engine(
    root: Path, docs: list[np.ndarray], kind: str = "scann", **opts: Any
) -> ShardEngine:
    spec = make_spec(
        [
            {
                "name": "v",
                "kind": "multi",
                "dim": DIM,
                "metric": "cosine",
                "index": {"kind": kind, "options": opts},
            }
        ]
    )
    engine = open_engine(root, spec, **_settings())
    engine.upsert(batch(range(len(docs)), {"v": docs}))
    engine.close()
    engine = open_engine(root, spec, **_settings(seal_threshold_tokens=1_000))
    drain(engine)
    assert "indexed=1" in engine.stats().index_state["v"]
    time.sleep(0.1)  # idle
    return engine


def _queries(rng: np.random.Generator, docs: list[np.ndarray], n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        d = docs[int(rng.integers(0, len(docs)))]
        q = d[rng.integers(0, len(d), int(rng.integers(3, 12)))]
        # relative noise ≈ 0.5 (the calibration's synthetic queries draw 0.3-0.8)
        q = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32)
        out.append((q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))
    return out


def _recall_vs_numpy(
    engine: ShardEngine, docs: list[np.ndarray], queries: list[np.ndarray], k: int = 10
) -> float:
    by_id = {uid(i): d for i, d in enumerate(docs)}
    got = []
    for q in queries:
        want = exact_top(q, by_id, k)
        hits = engine.search(VectorSearch("v", q, k)).hits
        kth = want[-1][1]
        got.append(sum(1 for h in hits if h.score >= kth - 1e-4) / len(want))
    return float(np.mean(got))


def test_calibration_meets_the_target_measured_against_numpy(
    tmp_path: Path, corpus: list[np.ndarray]
) -> None:
    engine = _indexed_engine(tmp_path, corpus, target_recall=0.97)
    try:
        report = engine.calibration_report()["v"]
        assert report["state"] == "pending" and report["depth"] == 1.0
        assert engine.calibration_due(engine.spec.vectors[0]) == "first calibration"
        assert engine.recalibrate()
        c = engine.stats().calibration["v"]
        assert c["state"] == "calibrated"
        m = c["measured"]
        assert m["target"] == 0.97 and m["k"] == 10 and m["queries"] == 48
        assert m["met"] and m["ci_low"] >= 0.97 and m["ci_low"] <= m["recall"] <= m["ci_high"]
        assert m["real_queries"] == 0 and m["n_tokens"] == sum(len(d) for d in corpus)
        assert c["depth"] == m["depth"] and f"{m['depth']:g}" in m["tried"]
        assert c["k_prime"] >= 1 and c["rerank_docs"] >= 1
        assert not engine.recalibrate()  # nothing changed: nothing due
        # the engine's searches at the chosen depth reach the target on other queries
        rng = np.random.default_rng(5)
        assert _recall_vs_numpy(engine, corpus, _queries(rng, corpus, 60)) >= 0.95
    finally:
        engine.close()


def test_calibration_is_persisted_and_reloaded_without_recalibrating(
    tmp_path: Path, corpus: list[np.ndarray]
) -> None:
    engine = _indexed_engine(tmp_path, corpus)
    assert engine.recalibrate()
    first = engine.calibration_report()["v"]["measured"]
    spec = engine.spec
    engine.close()
    on_disk = json.loads((tmp_path / "shard" / CALIBRATION_FILE).read_text())
    assert on_disk["vectors"]["v"]["depth"] == first["depth"]
    engine = open_engine(tmp_path, spec, **_settings(seal_threshold_tokens=1_000))
    try:
        assert engine.calibration_report()["v"]["measured"] == first
        assert engine.calibration_due(spec.vectors[0]) is None
        assert not engine.recalibrate()
    finally:
        engine.close()
    # an unreadable file is not fatal: the shard calibrates again
    (tmp_path / "shard" / CALIBRATION_FILE).write_text("{not json")
    engine = open_engine(tmp_path, spec, **_settings(seal_threshold_tokens=1_000))
    try:
        assert engine.calibration_report()["v"]["state"] == "pending"
    finally:
        engine.close()


def test_recalibration_triggers(tmp_path: Path, corpus: list[np.ndarray]) -> None:
    engine = _indexed_engine(tmp_path, corpus[:1_000])
    vspec = engine.spec.vectors[0]
    try:
        assert engine.recalibrate()
        assert engine.calibration_due(vspec) is None
        # real queries: once RESERVOIR_MIN have been served, they are measured with
        for q in _queries(np.random.default_rng(1), corpus, cal.RESERVOIR_MIN):
            engine.search(VectorSearch("v", q, 10))
        assert "real queries" in (engine.calibration_due(vspec) or "")
        assert engine.recalibrate()
        assert engine.calibration_report()["v"]["measured"]["real_queries"] == 48
        # exact queries and the recall report's probes are not workload samples
        engine.forget_queries()
        engine.search(VectorSearch("v", corpus[0], 10, exact=True))
        engine.search(VectorSearch("v", corpus[0], 10, probe=True))
        assert len(engine._reservoirs["v"]) == 0
        engine.search(VectorSearch("v", corpus[0], 10))
        assert len(engine._reservoirs["v"]) == 1
        # growth by RECALIBRATE_GROWTH, once the writes settle
        engine.upsert(batch(range(1_000, 1_500), {"v": corpus[1_000:]}))
        assert engine.calibration_due(vspec) is None  # writes are arriving
        time.sleep(0.1)
        assert (engine.calibration_due(vspec) or "").startswith("tokens ")
    finally:
        engine.close()


def test_muvera_vectors_calibrate_their_fde_candidates(
    tmp_path: Path, corpus: list[np.ndarray]
) -> None:
    engine = _indexed_engine(tmp_path, corpus, kind="muvera")
    try:
        assert engine.calibration_report()["v"]["fde_candidates"] == 500
        assert engine.recalibrate()
        report = engine.calibration_report()["v"]
        assert report["state"] == "calibrated" and report["measured"]["met"]
        assert report["fde_candidates"] == max(1, int(np.ceil(500 * report["depth"])))
        rng = np.random.default_rng(8)
        assert _recall_vs_numpy(engine, corpus, _queries(rng, corpus, 40)) >= 0.93
    finally:
        engine.close()


def test_options_that_fix_the_depth_turn_calibration_off(
    tmp_path: Path, corpus: list[np.ndarray]
) -> None:
    engine = _indexed_engine(tmp_path, corpus[:800], candidates_per_token=256)
    try:
        assert engine.calibration_report()["v"]["state"] == "fixed"
        assert not engine.recalibrate()
    finally:
        engine.close()


def test_calibration_stops_when_the_shard_closes(tmp_path: Path, corpus: list[np.ndarray]) -> None:
    spec = make_spec([{"name": "v", "kind": "multi", "dim": DIM, "metric": "cosine"}])
    engine = open_engine(
        tmp_path,
        spec,
        **_settings(seal_threshold_tokens=1_000, calibration_queries=2_000, calibration_duty=0.05),
    )
    engine.upsert(batch(range(len(corpus)), {"v": corpus}))
    drain(engine)
    engine.start_background()
    time.sleep(3.0)  # the calibration thread has started its (slow: 5 % duty) calibration
    t0 = time.monotonic()
    engine.close()
    assert time.monotonic() - t0 < 5.0
    assert engine.calibration_report()["v"]["state"] == "pending"
