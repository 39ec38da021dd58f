"""MUVERA fixed-dimensional encodings (shard.muvera) and the engine's ``muvera`` index kind."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import InvalidInput
from cluster.spec import MUVERA_DEFAULTS, CollectionSpec
from cluster.types import VectorSearch
from shard import muvera
from shard import search as search_mod
from shard.engine import ShardEngine
from shard.index import ScannTokenIndex
from shard.muvera import FdeEncoder, FdeParams, MuveraIndex, fde_scores, from_bf16, to_bf16
from tests.unit.test_shard_support import (
    batch,
    clustered_docs,
    drain,
    exact_top,
    make_spec,
    noisy_query,
    open_engine,
    uid,
)

N_DOCS, DIM = 3000, 64


def _params(
    dim: int = 16,
    repetitions: int = 3,
    k_sim: int = 3,
    d_proj: int = 4,
    fill: bool = True,
    seed: int = 7,
) -> FdeParams:
    return FdeParams(dim, repetitions, k_sim, d_proj, fill, seed)


def _ragged(
    rng: np.random.Generator, n: int, dim: int, lo: int = 0, hi: int = 9
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    docs = [
        rng.standard_normal((int(rng.integers(lo, hi)), dim)).astype(np.float32) for _ in range(n)
    ]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    flat = np.concatenate(docs) if offsets[-1] else np.zeros((0, dim), np.float32)
    return docs, flat, offsets


def _reference_fde(enc: FdeEncoder, doc: np.ndarray, *, query: bool) -> np.ndarray:
    """The paper's definition, one document at a time, with loops."""
    p = enc.params
    reps = []
    for r in range(p.repetitions):
        bits = (doc @ enc.simhash[r] > 0).astype(np.int64)
        codes = bits @ (1 << np.arange(p.k_sim)) if p.k_sim else np.zeros(len(doc), np.int64)
        proj = doc @ enc.projection[r] if enc.projection is not None else doc
        rep = np.zeros((p.n_partitions, p.proj_dim))
        for part in range(p.n_partitions):
            members = codes == part
            if members.any():
                rep[part] = proj[members].sum(axis=0) / (1 if query else members.sum())
            elif not query and p.fill_empty_partitions and len(doc):
                hamming = [bin(int(c) ^ part).count("1") for c in codes]
                rep[part] = proj[int(np.argmin(hamming))]  # first of the nearest
        reps.append(rep.reshape(-1))
    return np.concatenate(reps)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    "params",
    [
        _params(),
        _params(k_sim=0, d_proj=0, repetitions=2),
        _params(k_sim=4, d_proj=0),
        _params(fill=False),
        _params(repetitions=1, k_sim=2, d_proj=5),
    ],
)
def test_fde_matches_the_definition(params: FdeParams) -> None:
    rng = np.random.default_rng(0)
    docs, flat, offsets = _ragged(rng, 60, params.dim)
    enc = FdeEncoder.from_params(params)
    got = enc.encode_documents(flat, offsets, bf16=False)
    assert got.shape == (60, params.repetitions * 2**params.k_sim * params.proj_dim)
    want = np.stack([_reference_fde(enc, d, query=False) for d in docs])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for d in docs[:5]:
        if len(d):
            np.testing.assert_allclose(
                enc.encode_query(d), _reference_fde(enc, d, query=True), rtol=1e-5, atol=1e-5
            )
    assert not got[[i for i, d in enumerate(docs) if len(d) == 0]].any()  # empty: zeros


def test_fde_shape_and_determinism(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _params(dim=32, repetitions=5, k_sim=3, d_proj=8)
    assert p.fde_dim == 5 * 8 * 8
    rng = np.random.default_rng(1)
    _, flat, offsets = _ragged(rng, 40, 32, lo=1)
    a = FdeEncoder.from_params(p)
    b = FdeEncoder.from_params(p)
    assert a.digest == b.digest
    fa = a.encode_documents(flat, offsets)
    assert fa.dtype == np.uint16 and fa.shape == (40, p.fde_dim)  # bfloat16 bit patterns
    np.testing.assert_array_equal(fa, b.encode_documents(flat, offsets))
    other = FdeEncoder.from_params(_params(dim=32, repetitions=5, k_sim=3, d_proj=8, seed=8))
    assert other.digest != a.digest
    assert not np.array_equal(fa, other.encode_documents(flat, offsets))
    # Encoding in blocks gives the same rows as one document at a time.
    one = np.concatenate(
        [
            a.encode_documents(
                flat[offsets[i] : offsets[i + 1]], np.array([0, offsets[i + 1] - offsets[i]])
            )
            for i in range(40)
        ]
    )
    np.testing.assert_array_equal(fa, one)
    monkeypatch.setattr(muvera, "ENCODE_BLOCK_TOKENS", 7)  # many small blocks: same rows
    np.testing.assert_array_equal(fa, a.encode_documents(flat, offsets))
    monkeypatch.setattr(muvera, "ENCODE_BLOCK_BYTES", 1)  # one document per block
    np.testing.assert_array_equal(fa, a.encode_documents(flat, offsets))


def test_no_partitions_no_projection_is_the_mean_vector_formula() -> None:
    """k_sim 0, no projection: ⟨FDE(Q), FDE(D)⟩ = Σ_q ⟨mean of D's tokens, q⟩ (per rep)."""
    rng = np.random.default_rng(2)
    docs, flat, offsets = _ragged(rng, 30, 16, lo=1)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    for reps in (1, 3):
        enc = FdeEncoder.from_params(_params(repetitions=reps, k_sim=0, d_proj=0))
        qf = enc.encode_query(q)
        want = np.array([reps * sum(float(d.mean(axis=0) @ row) for row in q) for d in docs])
        exact = enc.encode_documents(flat, offsets, bf16=False) @ qf
        np.testing.assert_allclose(exact, want, rtol=1e-4, atol=1e-4)
        stored = fde_scores(enc.encode_documents(flat, offsets), qf)  # bfloat16 storage
        np.testing.assert_allclose(stored, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_bfloat16_storage_and_scan() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((257, 33)).astype(np.float32) * 10
    back = from_bf16(to_bf16(x))
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-8)
    q = rng.standard_normal(33).astype(np.float32)
    bits = to_bf16(x)
    np.testing.assert_allclose(fde_scores(bits, q), back @ q, rtol=1e-5, atol=1e-4)
    rows = np.array([5, 0, 256, 17], dtype=np.int64)
    np.testing.assert_allclose(fde_scores(bits, q, rows), (back @ q)[rows], rtol=1e-5, atol=1e-4)
    assert len(fde_scores(bits, q, rows[:0])) == 0


def test_index_serialize_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    _, flat, offsets = _ragged(rng, 50, 16, lo=1)
    index = MuveraIndex.build(
        flat, offsets, {"repetitions": 4, "k_sim": 2, "d_proj": 4, "seed": 99}
    )
    index.serialize(tmp_path)
    assert MuveraIndex.is_muvera_dir(tmp_path)
    loaded = MuveraIndex.load(tmp_path)
    assert isinstance(loaded.fde, np.memmap)  # memory-mapped, not read into RAM
    assert loaded.params == index.params and loaded.params.seed == 99
    np.testing.assert_array_equal(np.asarray(loaded.fde), index.fde)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(loaded.encoder.encode_query(q), index.encoder.encode_query(q))


# --------------------------------------------------------------------------- spec options


def _spec(options: Mapping[str, Any], dim: int = 128) -> CollectionSpec:
    return CollectionSpec.from_dict(
        {
            "name": "M",
            "vectors": [
                {"name": "v", "dim": dim, "index": {"kind": "muvera", "options": dict(options)}}
            ],
        }
    )


def test_muvera_options_accepted() -> None:
    spec = _spec(
        {
            "repetitions": 8,
            "k_sim": 0,
            "d_proj": 0,
            "fill_empty_partitions": False,
            "seed": 2**32 - 1,
            "candidates": 1000,
        }
    )
    assert spec.vectors[0].index.kind == "muvera"
    assert CollectionSpec.from_json(spec.to_json()) == spec
    assert _spec({}).vectors[0].index.options == {}
    assert set(MUVERA_DEFAULTS) == {
        "repetitions",
        "k_sim",
        "d_proj",
        "fill_empty_partitions",
        "seed",
        "candidates",
    }


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"ksim": 4}, "unknown muvera index option"),
        ({"num_leaves": 10}, "unknown muvera index option"),
        ({"candidates_per_token": 10}, "unknown muvera index option"),
        ({"k_sim": 11}, "k_sim must be an integer in 0..10"),
        ({"k_sim": -1}, "k_sim"),
        ({"repetitions": 0}, "repetitions must be an integer in 1..64"),
        ({"repetitions": 2.0}, "repetitions"),
        ({"d_proj": True}, "d_proj"),
        ({"d_proj": "8"}, "d_proj"),
        ({"candidates": 0}, "candidates"),
        ({"seed": -1}, "seed"),
        ({"fill_empty_partitions": 1}, "fill_empty_partitions must be a boolean"),
        ({"repetitions": 64, "k_sim": 10, "d_proj": 2}, "FDE dimension"),
        ({"repetitions": 64, "k_sim": 4, "d_proj": 0}, "FDE dimension"),  # 64·16·128
    ],
)
def test_bad_muvera_options_rejected(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        _spec(options)
    assert info.value.code == "invalid_input"
    assert fragment in info.value.message


def test_scann_options_are_not_checked_as_muvera() -> None:
    raw = {
        "name": "M",
        "vectors": [{"name": "v", "dim": 8, "index": {"kind": "scann", "options": {"k_sim": 99}}}],
    }
    assert CollectionSpec.from_dict(raw).vectors[0].index.options == {"k_sim": 99}


# --------------------------------------------------------------------------- engine


MUVERA_OPTIONS = {"candidates": 100}


def _muvera_spec(options: Mapping[str, Any] = MUVERA_OPTIONS) -> CollectionSpec:
    return make_spec(
        [
            {
                "name": "v",
                "kind": "multi",
                "dim": DIM,
                "metric": "cosine",
                "index": {"kind": "muvera", "options": dict(options)},
            }
        ]
    )


def _engine(root: Path, options: Mapping[str, Any] = MUVERA_OPTIONS, **kw: Any) -> ShardEngine:
    settings = {"seal_threshold_tokens": 1_000, "brute_force_max_tokens": 1_000, **kw}
    return open_engine(root, _muvera_spec(options), **settings)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Any]]]:
    """One shard with one sealed muvera segment (built once per module), closed."""
    rng = np.random.default_rng(3)
    docs = clustered_docs(rng, N_DOCS, DIM)
    root = tmp_path_factory.mktemp("muvera")
    engine = _engine(root, seal_threshold_tokens=10_000_000)
    props = [{"title": f"doc {i}", "n": i % 100} for i in range(N_DOCS)]
    for s in range(0, N_DOCS, 500):
        engine.upsert(batch(range(s, s + 500), {"v": docs[s : s + 500]}, props[s : s + 500]))
    engine.close()
    engine = _engine(root)
    assert drain(engine) == 2  # seal + build the FDEs
    assert engine.stats().index_state["v"].startswith("muvera: indexed=1 building=0")
    engine.close()
    yield root, docs


def _recall(
    engine: ShardEngine, docs: list[np.ndarray], n: int = 30, seed: int = 11
) -> tuple[float, float, float]:
    """(recall@10 of the engine, of exact MaxSim over as many random documents, mean
    candidates) against exact MaxSim over every document."""
    rng = np.random.default_rng(seed)
    truth = {uid(i): d for i, d in enumerate(docs)}
    got, rand, cands = [], [], []
    for _ in range(n):
        q = noisy_query(rng, docs[int(rng.integers(len(docs)))])
        res = engine.search(VectorSearch("v", q, 10))
        want = {u for u, _ in exact_top(q, truth, 10)}
        got.append(len(want & {h.uuid for h in res.hits}) / 10)
        cands.append(res.n_candidates)
        pick = rng.choice(len(docs), res.n_candidates, replace=False)
        sub = {uid(int(i)): docs[int(i)] for i in pick}
        rand.append(len(want & {u for u, _ in exact_top(q, sub, 10)}) / 10)
    return float(np.mean(got)), float(np.mean(rand)), float(np.mean(cands))


def test_muvera_recall_at_10(corpus: tuple[Path, list[Any]]) -> None:
    root, docs = corpus
    engine = _engine(root)
    recall, random_recall, candidates = _recall(engine, docs)
    # 100 of 3,000 documents re-scored (3 %). Measured 0.85 (default options); random
    # candidates of the same count: 0.04.
    assert candidates == 100
    assert recall >= 0.75, recall
    assert random_recall < 0.2, random_recall
    engine.close()


def test_reopen_loads_fdes_and_searches_the_same(
    corpus: tuple[Path, list[Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, docs = corpus
    shutil.copytree(root, tmp_path / "copy")
    engine = _engine(tmp_path / "copy")
    rng = np.random.default_rng(5)
    queries = [noisy_query(rng, docs[int(rng.integers(N_DOCS))]) for _ in range(5)]
    before = [
        [(h.uuid, h.score) for h in engine.search(VectorSearch("v", q, 10)).hits] for q in queries
    ]
    engine.close()

    def no_build(*args: Any, **kwargs: Any) -> MuveraIndex:
        raise AssertionError("FDEs rebuilt on open")

    monkeypatch.setattr(MuveraIndex, "build", no_build)
    monkeypatch.setattr(muvera, "_ENCODERS", {})  # as in a fresh process
    engine = _engine(tmp_path / "copy")
    assert engine.maintenance() is False
    assert engine.stats().index_state["v"].startswith("muvera: indexed=1")
    seg_index = engine._sealed[0].indexes["v"]
    assert isinstance(seg_index, MuveraIndex) and isinstance(seg_index.fde, np.memmap)
    assert 0 < engine.index_bytes() < 2 * seg_index.nbytes()
    after = [
        [(h.uuid, h.score) for h in engine.search(VectorSearch("v", q, 10)).hits] for q in queries
    ]
    assert after == before
    engine.close()


def test_filters_and_deletes_are_respected(
    corpus: tuple[Path, list[Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, docs = corpus
    shutil.copytree(root, tmp_path / "copy")
    engine = _engine(tmp_path / "copy")
    rng = np.random.default_rng(6)
    q = noisy_query(rng, docs[42])
    top = [h.uuid for h in engine.search(VectorSearch("v", q, 10)).hits]
    assert uid(42) in top
    engine.delete(top[:5])
    res = engine.search(VectorSearch("v", q, 10))
    assert len(res.hits) == 10 and not {h.uuid for h in res.hits} & set(top[:5])
    assert res.n_candidates == 100
    deleted = {int(u[-12:], 16) for u in top[:5]}

    class Rare:  # 30 objects pass: scored exactly, like the token-index path
        def matches(self, props: Mapping[str, Any]) -> bool:
            return int(props["n"]) == 17

    res = engine.search(VectorSearch("v", q, 10, filter=Rare()))
    rare = {uid(i): d for i, d in enumerate(docs) if i % 100 == 17 and i not in deleted}
    assert [h.uuid for h in res.hits] == [u for u, _ in exact_top(q, rare, 10)]
    assert res.n_candidates == 30
    # Below, filters go through the FDEs (one eligibility rule for fde_allow_lists and
    # search_segments).
    monkeypatch.setattr(search_mod, "EXACT_FILTER_MAX_OBJECTS", 10)
    res = engine.search(VectorSearch("v", q, 10, filter=Rare()))
    assert len(res.hits) == 10 and res.n_candidates == 30  # fewer eligible than candidates
    assert [h.uuid for h in res.hits] == [u for u, _ in exact_top(q, rare, 10)]

    class Odd:  # half of the objects pass
        def matches(self, props: Mapping[str, Any]) -> bool:
            return int(props["n"]) % 2 == 1

    res = engine.search(VectorSearch("v", q, 10, filter=Odd()))
    assert len(res.hits) == 10 and res.n_candidates == 100
    assert all(int(h.uuid[-12:], 16) % 2 == 1 for h in res.hits)
    odd = {uid(i): d for i, d in enumerate(docs) if i % 2 == 1 and i not in deleted}
    want = {u for u, _ in exact_top(q, odd, 10)}
    assert len(want & {h.uuid for h in res.hits}) >= 6
    engine.close()


def test_growing_and_several_sealed_segments(tmp_path: Path) -> None:
    """FDE candidates are shard-wide over several sealed segments; the growing segment stays
    exact; a compaction re-encodes the merged segment."""
    rng = np.random.default_rng(7)
    docs = clustered_docs(rng, 900, DIM)
    engine = _engine(
        tmp_path, {"candidates": 60}, seal_threshold_tokens=4_000, max_segment_tokens=6_000
    )
    for s in range(0, 900, 100):
        engine.upsert(batch(range(s, s + 100), {"v": docs[s : s + 100]}))
        if s < 800:
            drain(engine)  # the last batch stays in the growing segment
    state = engine.stats().index_state["v"]
    n_indexed = int(state.split("indexed=")[1].split()[0])
    assert n_indexed >= 2 and "growing=1" in state, state
    truth = {uid(i): d for i, d in enumerate(docs)}
    growing = engine._growing.n_objects
    recalls = []
    for _ in range(10):
        q = noisy_query(rng, docs[int(rng.integers(900))])
        res = engine.search(VectorSearch("v", q, 10))
        assert res.n_candidates == 60 + growing
        want = {u for u, _ in exact_top(q, truth, 10)}
        recalls.append(len(want & {h.uuid for h in res.hits}) / 10)
    assert np.mean(recalls) >= 0.6, recalls
    engine.close()
    engine = _engine(
        tmp_path,
        {"candidates": 60},
        seal_threshold_tokens=4_000,
        max_segment_tokens=100_000,
        seal_idle_s=0.01,
    )
    drain(engine)  # idle: the tail is sealed, everything merged into one segment
    state = engine.stats().index_state["v"]
    assert state.startswith("muvera: indexed=1 building=0 exact=0 growing=0"), state
    q = noisy_query(rng, docs[3])
    assert uid(3) in {h.uuid for h in engine.search(VectorSearch("v", q, 10)).hits}
    engine.close()


def test_index_kind_mismatch_on_disk_is_rebuilt(
    corpus: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    root, _ = corpus
    shutil.copytree(root, tmp_path / "copy")
    spec = make_spec([{"name": "v", "kind": "multi", "dim": DIM, "metric": "cosine"}])
    engine = open_engine(
        tmp_path / "copy", spec, seal_threshold_tokens=1_000, brute_force_max_tokens=1_000
    )
    assert "scann: indexed=0 building=1" in engine.stats().index_state["v"]
    assert drain(engine) == 1
    assert isinstance(engine._sealed[0].indexes["v"], ScannTokenIndex)
    engine.close()


def test_candidates_option_and_k() -> None:
    assert muvera.candidates_option({}) == MUVERA_DEFAULTS["candidates"]
    assert muvera.candidates_option({"candidates": 7}) == 7


# --------------------------------------------------------------------------- benchmark


def test_bench_options_parse() -> None:
    from bench.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--engine-index",
            "scann,muvera",
            "--engine-index-option",
            "k_sim=3",
            "--engine-index-option",
            "fill_empty_partitions=false",
            "--engine-candidates",
            "50,80",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.engine_indexes == ("scann", "muvera")
    assert cfg.engine_index_options == {"k_sim": 3, "fill_empty_partitions": False}
    assert cfg.engine_candidates_sweep == (50, 80)
    for bad in (
        ["--engine-index", "hnsw"],
        ["--engine-index-option", "k_sim=99"],
        ["--engine-index-option", "ksim=3"],
        ["--engine-index-option", "k_sim"],
    ):
        with pytest.raises(SystemExit):
            config_from_args(build_parser().parse_args(bad))


def test_bench_runs_the_muvera_engine(tmp_path: Path) -> None:
    from bench.harness import BenchConfig, run_benchmark
    from bench.report import format_table

    cfg = BenchConfig(
        size="tiny",
        n_docs=400,
        n_queries=6,
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out",
        skip_faiss=True,
        skip_bruteforce=True,
        isolate=False,
        warmup=0,
        engine_indexes=("muvera",),
        engine_index_options={"candidates": 40},
        engine_candidates_sweep=(400,),
        engine_settings={
            "seal_threshold_tokens": 4096,
            "brute_force_max_tokens": 2048,
            "seal_idle_s": 0.0,
        },
    )
    doc = run_benchmark(cfg, log=lambda _: None)
    rows = {r["pipeline"]: r for r in doc["results"]}
    main, sweep = rows["colshard-engine muvera"], rows["colshard-engine muvera C400"]
    assert "error" not in main, main
    assert main["family"] == "colshard-muvera" and main["params"]["candidates"] == 40
    assert main["params"]["index"] == {"kind": "muvera", "options": {"candidates": 40}}
    assert main["candidates_mean"] <= 40 + 200  # + the growing segment's documents
    assert main["index_bytes_per_token"] > 0 and main["build_s"] > 0
    assert main["recall_at_10"] >= 0.5  # a floor: 40 of 400 documents re-scored
    assert main["reopen_recall_at_10"] >= 0.5
    assert sweep["recall_at_10"] == 1.0  # every document re-scored: exact
    assert all(s.startswith("muvera: ") for st in main["stats"] for s in st["index_state"].values())
    mv = doc["summary"]["muvera"]
    assert mv["index_bytes_per_token"] == main["index_bytes_per_token"]
    assert "colshard-engine muvera C400" in format_table(doc)
