"""Size-tiered compaction (``plan_merge``) and idle sealing of the growing segment."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.types import VectorSearch
from shard.engine import ShardEngine
from shard.index import ScannTokenIndex
from shard.maintenance import EAGER_MERGE_GROWTH, plan_merge
from tests.unit.test_shard_support import (
    batch,
    drain,
    exact_top,
    make_spec,
    open_engine,
    random_docs,
    uid,
)

DIM = 8
M = 4_000_000


def test_plan_merge_is_size_tiered() -> None:
    g = 3.5  # merge_factor 4
    assert plan_merge([77] * 3, M, g, 65) == []  # 3 similar segments: not yet
    assert plan_merge([77] * 4, M, g, 65) == [0, 1, 2, 3]
    # the smallest first; a big segment waits until the small ones add up
    assert plan_merge([1000, 10, 11, 12, 13], M, g, 5) == [1, 2, 3, 4]
    assert plan_merge([308, 308, 77], M, g, 65) == []
    assert sorted(plan_merge([308, 308, 77], M, g, 65, eager=True)) == [0, 1, 2]  # idle
    assert plan_merge([3_000_000, 3_000_000], M, g, 65, eager=True) == []  # over the cap
    assert plan_merge([2_000_000, 2_000_000, 10], M, g, 65, eager=True) == []
    # below the seal size merges are eager too, but still grow the largest input by 1.5x
    assert plan_merge([10, 12], M, g, 65) == [0, 1]
    assert plan_merge([5, 50], M, g, 65) == []
    assert plan_merge([], M, g, 65) == [] and plan_merge([5], M, g, 65, eager=True) == []


@pytest.mark.parametrize("eager_every", [0, 7])
def test_each_token_is_rewritten_a_logarithmic_number_of_times(eager_every: int) -> None:
    """Segments of ~seal size arrive one by one (some idle periods in between): the segment
    count stays small and no token is re-written more than log1.5(max / seal size) times."""
    rng = np.random.default_rng(0)
    seal, cap = 1_000, 200_000
    segments: list[tuple[int, int]] = []  # (size, rewrites of its tokens so far)
    written = rewritten = 0
    most = 0
    for step in range(1, 600):
        size = int(rng.integers(seal, 2 * seal))
        segments.append((size, 0))
        written += size
        while True:
            chosen = plan_merge(
                [s for s, _ in segments],
                cap,
                3.5,
                seal,
                eager=bool(eager_every) and step % eager_every == 0,
            )
            if not chosen:
                break
            merged = sum(segments[i][0] for i in chosen)
            depth = max(segments[i][1] for i in chosen) + 1
            rewritten += merged
            segments = [s for i, s in enumerate(segments) if i not in chosen]
            segments.append((merged, depth))
        most = max(most, len(segments))
        assert all(s <= cap for s, _ in segments)
    bound = math.ceil(math.log(cap / seal, EAGER_MERGE_GROWTH))
    assert max(d for _, d in segments) <= bound
    assert rewritten <= bound * written
    assert most <= 24  # ~3 per size tier (plus the full ones)
    if not eager_every:
        assert rewritten <= 4 * written  # the lazy factor: ~log_3.5 rewrites per token


def _flat_spec() -> Any:
    return make_spec(
        [{"name": "v", "kind": "multi", "dim": DIM, "metric": "dot", "index": {"kind": "flat"}}]
    )


def test_import_converges_to_one_segment_once_idle(tmp_path: Path) -> None:
    """Interleaved maintenance merges tiers during the import; once idle the growing tail is
    sealed and everything merges into one segment. Results stay exact throughout; tombstones
    are dropped; the layout survives a restart."""
    rng = np.random.default_rng(4)
    spec = _flat_spec()
    docs = random_docs(rng, 700, DIM, 4, 8)
    kw: dict[str, Any] = {
        "seal_threshold_tokens": 200,
        "brute_force_max_tokens": 50,
        "merge_factor": 4,
        "seal_idle_s": 0.3,
    }
    engine = open_engine(tmp_path, spec, **kw)
    live = {}
    most = 0
    for start in range(0, 690, 30):
        engine.upsert(batch(range(start, start + 30), {"v": docs[start : start + 30]}))
        live.update({uid(i): docs[i] for i in range(start, start + 30)})
        if start % 120 == 0:
            engine.delete([uid(start + 1)])
            live.pop(uid(start + 1))
        drain(engine)
        most = max(most, engine.stats().n_segments)
    engine.upsert(batch(range(690, 700), {"v": docs[690:]}))  # a tail below the seal size
    live.update({uid(i): docs[i] for i in range(690, 700)})
    n_import = engine.stats().n_segments
    assert n_import >= 3 and most <= 9, (n_import, most)
    assert "growing=1" in engine.stats().index_state["v"]
    queries = [rng.standard_normal((3, DIM)).astype(np.float32) for _ in range(4)]
    before = [[h.uuid for h in engine.search(VectorSearch("v", q, 15)).hits] for q in queries]
    assert before == [[u for u, _ in exact_top(q, live, 15)] for q in queries]
    time.sleep(0.35)
    assert engine.idle()
    assert drain(engine) >= 2  # the idle seal, then merges
    assert engine.stats().n_segments == 1
    assert "growing=0" in engine.stats().index_state["v"]
    assert [
        [h.uuid for h in engine.search(VectorSearch("v", q, 15)).hits] for q in queries
    ] == before
    assert engine.count() == len(live)
    engine.close()
    engine = open_engine(tmp_path, spec, **kw)
    assert engine.stats().n_segments == 1 and engine.count() == len(live)
    assert [p.name for p in (tmp_path / "shard" / "segments").iterdir()] == [
        f"seg-{engine._sealed[0].segment_id:08d}"
    ]
    sealed = engine._sealed[0]
    assert sealed.n_objects == len(live)  # tombstoned rows were dropped
    assert [
        [h.uuid for h in engine.search(VectorSearch("v", q, 15)).hits] for q in queries
    ] == before
    engine.close()


def test_small_idle_tail_stays_growing_and_writes_reset_idle(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    engine = open_engine(
        tmp_path,
        _flat_spec(),
        seal_threshold_tokens=10_000,
        brute_force_max_tokens=200,
        seal_idle_s=0.2,
    )
    engine.upsert(batch(range(10), {"v": random_docs(rng, 10, DIM, 4, 4)}))  # 40 tokens
    time.sleep(0.25)
    assert engine.idle() and drain(engine) == 0  # cheap to scan exactly: left growing
    engine.upsert(batch(range(10, 60), {"v": random_docs(rng, 50, DIM, 4, 4)}))  # 240 tokens
    assert not engine.idle() and drain(engine) == 0  # not idle yet
    time.sleep(0.25)
    assert drain(engine) == 1
    assert "growing=0" in engine.stats().index_state["v"] and engine.count() == 60
    engine.close()


def test_merged_segment_is_indexed_before_the_swap_and_loaded_at_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(6)
    dim = 16
    spec = make_spec([{"name": "v", "kind": "multi", "dim": dim, "metric": "cosine"}])
    docs = random_docs(rng, 400, dim, 8, 12, normalise=True)
    kw: dict[str, Any] = {
        "seal_threshold_tokens": 1_000,
        "brute_force_max_tokens": 500,
        "candidates_per_token": 64,
        "seal_idle_s": 0.2,
    }
    engine = open_engine(tmp_path, spec, **kw)
    for start in range(0, 400, 50):
        engine.upsert(batch(range(start, start + 50), {"v": docs[start : start + 50]}))
        drain(engine)
    time.sleep(0.25)
    drain(engine)
    state = engine.stats().index_state["v"]
    assert state.endswith("indexed=1 building=0 exact=0 growing=0 waiting=0"), state
    engine.close()

    def no_build(*args: Any, **kwargs: Any) -> ScannTokenIndex:
        raise AssertionError("index rebuilt on open")

    monkeypatch.setattr(ScannTokenIndex, "build", no_build)
    engine = ShardEngine(spec, 0, tmp_path / "shard", engine.settings)
    assert engine.stats().index_state["v"] == state
    assert engine.maintenance() is False
    for i in (0, 123, 399):
        assert engine.search(VectorSearch("v", docs[i], 1)).hits[0].uuid == uid(i)
    engine.close()


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ScannTokenIndex.build to record the token count of every build."""
    built: list[int] = []
    real = ScannTokenIndex.build.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, tokens: Any, *args: Any, **kwargs: Any) -> ScannTokenIndex:
        built.append(len(tokens))
        return real(cls, tokens, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(ScannTokenIndex, "build", classmethod(counting))
    return built


def _bulk_import(engine: ShardEngine, docs: list[np.ndarray], step: int = 25) -> list[str]:
    """Import in batches with maintenance after each (a busy shard); the index states seen."""
    states = []
    for start in range(0, len(docs), step):
        ids = range(start, min(start + step, len(docs)))
        engine.upsert(batch(ids, {"v": [docs[i] for i in ids]}))
        drain(engine)
        states.append(engine.stats().index_state["v"])
    return states


def _deferral_case(
    seed: int, n_docs: int, **settings_kw: Any
) -> tuple[Any, list[np.ndarray], dict[str, Any]]:
    """A cosine 16-d collection, ``n_docs`` documents of 8-12 tokens, and engine settings with
    small seals (300 tokens) and deferral on (idle after ``seal_idle_s``)."""
    rng = np.random.default_rng(seed)
    spec = make_spec([{"name": "v", "kind": "multi", "dim": 16, "metric": "cosine"}])
    docs = random_docs(rng, n_docs, 16, 8, 12, normalise=True)
    kw: dict[str, Any] = {
        "seal_threshold_tokens": 300,
        "brute_force_max_tokens": 100,
        "candidates_per_token": 64,
        **settings_kw,
    }
    return spec, docs, kw


def test_deferred_indexing_builds_each_token_once_per_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While writes arrive, sealed segments wait unindexed (and are scored exactly) until they
    add up to index_defer_tokens; then they are merged and indexed once. Idle: what waits is
    merged and indexed. With deferral off every seal and merge tier indexes its tokens."""
    spec, docs, kw = _deferral_case(7, 600, seal_idle_s=0.3, index_defer_tokens=2_000)
    total = sum(len(d) for d in docs)  # ~6,000 tokens
    built = _count_builds(monkeypatch)
    engine = open_engine(tmp_path, spec, **kw)
    states = _bulk_import(engine, docs)
    # Before 2,000 tokens were sealed nothing was indexed; the first build covered them all.
    assert built and built[0] >= 2_000 and all(n >= 2_000 for n in built), built
    # sealed segments waited, nothing indexed yet and nothing due (not "building")
    assert any("indexed=0 building=0" in s and "waiting=0" not in s for s in states), states
    assert max(int(s.split("waiting=")[1].split()[0]) for s in states) >= 3
    # queries during the burst are exact over the waiting segments
    for i in (0, 301, len(docs) - 1):
        assert engine.search(VectorSearch("v", docs[i], 1)).hits[0].uuid == uid(i)
    busy_builds = len(built)
    busy = list(built)
    time.sleep(0.35)
    drain(engine)
    state = engine.stats().index_state["v"]
    assert state.endswith("building=0 exact=0 growing=0 waiting=0"), state
    assert len(built) > busy_builds  # the idle shard indexed what waited
    assert sum(busy) <= total, busy  # while busy each token was indexed at most once
    for i in (0, 301, len(docs) - 1):
        assert engine.search(VectorSearch("v", docs[i], 1)).hits[0].uuid == uid(i)
    engine.close()

    # Deferral off (index_defer_tokens 0, or no idle detection): every seal and merge indexes.
    for off in ({"index_defer_tokens": 0}, {"seal_idle_s": 0.0}):
        built.clear()
        engine = open_engine(tmp_path / str(len(off)) / next(iter(off)), spec, **{**kw, **off})
        states = _bulk_import(engine, docs)
        assert "indexed=1" in states[1] or "indexed=2" in states[1], states[:3]
        assert min(built) < 2_000 and sum(built) > 1.5 * total, (built, total)
        engine.close()


def test_merge_of_indexed_segments_is_indexed_before_the_swap_while_busy(tmp_path: Path) -> None:
    """With deferral on, a size-tiered merge of indexed segments is still indexed before it
    replaces them (never a step back to exact scoring)."""
    spec, docs, kw = _deferral_case(
        8, 900, seal_idle_s=60.0, index_defer_tokens=600, merge_factor=3
    )
    engine = open_engine(tmp_path, spec, **kw)
    states = _bulk_import(engine, docs)
    indexed = [int(s.split("indexed=")[1].split()[0]) for s in states]
    assert max(indexed) >= 3  # several indexed segments appeared ...
    final = engine.stats().index_state["v"]
    assert int(final.split("indexed=")[1].split()[0]) < max(indexed), states  # ... and merged
    # every merge output was indexed: never more waiting tokens than one deferral batch
    for s in states:
        assert int(s.split("exact=")[1].split()[0]) == 0
    engine.close()


def test_a_searched_shard_indexes_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deferral is for bulk loads nobody queries: after a vector search the shard indexes each
    sealed segment at once (its queries would otherwise scan the waiting ones exactly)."""
    spec, docs, kw = _deferral_case(9, 300, seal_idle_s=60.0, index_defer_tokens=1_000_000)
    built = _count_builds(monkeypatch)
    engine = open_engine(tmp_path, spec, **kw)
    states = _bulk_import(engine, docs[:150])
    assert not built and "waiting=0" not in states[-1], states[-1]  # a bulk load: waits
    engine.search(VectorSearch("v", docs[0], 1))
    assert "waiting=0" in engine.stats().index_state["v"]
    drain(engine)  # the waiting segments are due now, and indexed one by one
    assert built and max(built) < 1_000_000
    state = engine.stats().index_state["v"]
    assert "indexed=0" not in state and "building=0 exact=0" in state, state
    assert state.endswith("waiting=0"), state
    assert engine.search(VectorSearch("v", docs[7], 1)).hits[0].uuid == uid(7)
    engine.close()
