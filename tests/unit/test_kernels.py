"""The compiled MaxSim kernels (``shard.kernels``) against the reference MaxSim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shard import kernels
from shard.maxsim import maxsim_docs, maxsim_flat, maxsim_reference


def _docs(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(0, 40, n)  # some empty documents
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.standard_normal((int(offsets[-1]), dim)).astype(np.float32)
    return tokens, offsets


def _reference(
    query: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, docs: np.ndarray
) -> np.ndarray:
    return maxsim_reference(query, [tokens[offsets[d] : offsets[d + 1]] for d in docs])


@pytest.mark.parametrize("n_query", [1, 7, 32])
def test_maxsim_rows_scores_chosen_documents_where_they_lie(n_query: int) -> None:
    rng = np.random.default_rng(n_query)
    tokens, offsets = _docs(rng, 300, 24)
    query = rng.standard_normal((n_query, 24)).astype(np.float32)
    docs = np.sort(rng.choice(300, 120, replace=False)).astype(np.int64)
    got = kernels.maxsim_rows(query, tokens, offsets[docs], offsets[docs + 1])
    want = _reference(query, tokens, offsets, docs)
    empty = offsets[docs + 1] == offsets[docs]
    assert empty.any() and np.isneginf(got[empty]).all()
    np.testing.assert_allclose(got[~empty], want[~empty], rtol=1e-5, atol=1e-5)
    # in any order, and through maxsim_docs
    shuffled = docs[::-1].copy()
    np.testing.assert_array_equal(maxsim_docs(query, tokens, offsets, shuffled), got[::-1])


def test_maxsim_docs_reads_a_memory_map_and_float16_takes_the_gather_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tokens, offsets = _docs(rng, 80, 16)
    path = tmp_path / "tokens.f32"
    tokens.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=tokens.shape)
    query = rng.standard_normal((5, 16)).astype(np.float32)
    docs = np.arange(0, 80, 3, dtype=np.int64)
    want = _reference(query, tokens, offsets, docs)
    finite = np.isfinite(want)
    got = maxsim_docs(query, mapped, offsets, docs)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert np.isneginf(got[~finite]).all()
    half = tokens.astype(np.float16)
    got16 = maxsim_docs(query, half, offsets, docs)
    want16 = _reference(query, half.astype(np.float32), offsets, docs)
    np.testing.assert_allclose(got16[finite], want16[finite], rtol=1e-5, atol=1e-5)


def test_segment_max_sum_matches_reduceat_and_leaves_empty_ranges() -> None:
    rng = np.random.default_rng(9)
    sims = rng.standard_normal((500, 32)).astype(np.float32)
    offsets = np.array([0, 10, 10, 11, 250, 250, 500], dtype=np.int64)
    out = np.full(6, -np.inf)
    kernels.segment_max_sum(sims, offsets, out)
    for i in range(6):
        lo, hi = offsets[i], offsets[i + 1]
        if hi == lo:
            assert out[i] == -np.inf
        else:
            assert out[i] == pytest.approx(
                float(sims[lo:hi].max(axis=0).astype(np.float64).sum()), rel=1e-12
            )


def test_maxsim_flat_through_the_kernel_matches_the_reference() -> None:
    rng = np.random.default_rng(11)
    tokens, offsets = _docs(rng, 200, 12)
    query = rng.standard_normal((9, 12)).astype(np.float32)
    got = maxsim_flat(query, tokens, offsets, chunk_tokens=300)  # several blocks
    want = _reference(query, tokens, offsets, np.arange(200))
    finite = np.isfinite(want)
    assert not finite.all()
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert np.isneginf(got[~finite]).all()


def test_no_documents_or_no_query_rows() -> None:
    tokens = np.ones((3, 4), dtype=np.float32)
    empty = np.zeros(0, dtype=np.int64)
    assert kernels.maxsim_rows(np.ones((2, 4), np.float32), tokens, empty, empty).shape == (0,)
    got = kernels.maxsim_rows(np.zeros((0, 4), np.float32), tokens, np.array([0]), np.array([3]))
    assert np.isneginf(got).all()
    kernels.warm()


def test_without_a_writable_cache_the_kernels_are_compiled_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[dict[str, object]] = []

    def njit(**options: object) -> object:
        asked.append(options)
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return lambda fn: ("compiled", fn)

    def f() -> None: ...

    monkeypatch.setattr(kernels, "njit", njit)
    assert kernels._jit(f) == ("compiled", f)
    assert asked == [{"cache": True, "nogil": True}, {"nogil": True}]


@pytest.mark.parametrize("extra_keys", [0, 1_000_000])  # dense table; sorted (large space)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hit_table_scores_like_the_reference_imputation(seed: int, extra_keys: int) -> None:
    """Two blocks (plans) of hits with duplicates, unsorted rows, padding, ineligible (-inf)
    hits and a per-row threshold, against ``shard.search.impute_scores`` fed the kept hits.
    A key space far larger than the hits takes the sorting path instead of a dense table."""
    from shard.search import impute_scores

    rng = np.random.default_rng(seed)
    n_query, width = 6, 40
    n_docs = (50, 30)
    blocks = []
    for n in n_docs:
        n_tokens = n * 3
        tok2doc = np.repeat(np.arange(n), 3).astype(np.int32)
        ids = rng.integers(0, n_tokens, (n_query, width)).astype(np.int64)
        sims = rng.standard_normal((n_query, width)).astype(np.float32)
        ids[:, -3:] = -1  # padding
        sims[:, -3:] = -np.inf
        sims[rng.random((n_query, width)) < 0.1] = -np.inf  # ineligible
        blocks.append((ids, sims, tok2doc))
    tau = rng.normal(-0.5, 0.3, n_query).astype(np.float32)
    tau[0] = -np.inf  # fewer hits than k': every finite hit counts
    table = kernels.HitTable(sum(n_docs) + extra_keys, tau)
    base = 0
    q_rows, keys, kept = [], [], []
    for (ids, sims, tok2doc), n in zip(blocks, n_docs, strict=True):
        table.mark(ids, sims, tok2doc, base)
        keep = np.isfinite(sims) & (sims >= tau[:, None])
        q, c = np.nonzero(keep)
        q_rows.append(q)
        keys.append(tok2doc[ids[q, c]].astype(np.int64) + base)
        kept.append(sims[q, c])
        base += n
    want_docs, _ = impute_scores(
        n_query,
        np.concatenate(q_rows),
        np.concatenate(keys),
        np.concatenate(kept),
        np.zeros(n_query, np.float32),
    )
    docs = table.documents()
    np.testing.assert_array_equal(docs, want_docs)
    imputed = rng.normal(-1.0, 0.2, n_query).astype(np.float32)
    spread = rng.uniform(0, 1, n_query).astype(np.float32)
    shift = rng.normal(0, 0.1, len(docs)).astype(np.float32)
    got = table.scores(imputed, spread, shift)
    _, want = impute_scores(
        n_query,
        np.concatenate(q_rows),
        np.concatenate(keys),
        np.concatenate(kept),
        imputed,
        (shift, spread),
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unique_keys_is_numpy_unique_on_both_paths() -> None:
    rng = np.random.default_rng(4)
    keys = rng.integers(0, 5_000, 3_000).astype(np.int64)
    for n_keys in (5_000, 10_000_000):  # dense table; sorting
        u, inv = kernels.unique_keys(keys, n_keys)
        want_u, want_inv = np.unique(keys, return_inverse=True)
        np.testing.assert_array_equal(u, want_u)
        np.testing.assert_array_equal(inv, want_inv)
        assert u.dtype == inv.dtype == np.int64


def test_a_hit_table_without_kept_hits_has_no_documents() -> None:
    table = kernels.HitTable(10, np.zeros(2, dtype=np.float32))
    table.mark(
        np.zeros((2, 3), dtype=np.int64),
        np.full((2, 3), -1.0, dtype=np.float32),
        np.zeros(1, dtype=np.int32),
        0,
    )  # every hit below its row's threshold
    assert len(table.documents()) == 0
    assert (
        len(table.scores(np.zeros(2, np.float32), np.zeros(2, np.float32), np.zeros(0, np.float32)))
        == 0
    )
