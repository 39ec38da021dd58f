"""shard.search's approximate pre-scoring (missing-similarity imputation) against exact MaxSim."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from shard import search as search_mod
from shard.maxsim import maxsim_reference
from shard.search import impute_scores, search_segments
from shard.segment import SegmentView, VectorView


def _corpus(
    rng: np.random.Generator, n_docs: int, dim: int, n_centers: int = 40
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    centers = rng.standard_normal((n_centers, dim)).astype(np.float32)
    docs = []
    for _ in range(n_docs):
        m = int(rng.integers(4, 13))
        t = centers[rng.integers(0, n_centers, m)] + 0.5 * rng.standard_normal((m, dim))
        docs.append((t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32))
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return docs, np.concatenate(docs), offsets


class ExactIndex:
    """A token index with exact inner products (what ScaNN approximates)."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens
        self.n_tokens = len(tokens)

    def search(
        self, queries: npt.NDArray[np.float32], k: int, leaves_factor: float = 1.0
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        k = min(k, self.n_tokens)  # exact: every leaf is searched whatever leaves_factor
        sims = queries @ self.tokens.T
        ids = np.argsort(-sims, axis=1, kind="stable")[:, :k].astype(np.int64)
        return ids, np.take_along_axis(sims, ids, axis=1).astype(np.float32)


class _Seg:
    def __init__(self, n: int) -> None:
        self.uuids = [f"{i:08d}" for i in range(n)]


def _view(docs_tokens: np.ndarray, offsets: np.ndarray, indexed: bool = True) -> SegmentView:
    n = len(offsets) - 1
    tok2doc = np.repeat(np.arange(n, dtype=np.int32), np.diff(offsets))
    index = cast(Any, ExactIndex(docs_tokens)) if indexed else None
    vec = VectorView(docs_tokens, offsets, tok2doc if indexed else None, index)
    return SegmentView(cast(Any, _Seg(n)), n, np.zeros(n, dtype=np.bool_), {"v": vec})


def _exact_ranking(query: np.ndarray, docs: list[np.ndarray], k: int) -> list[int]:
    scores = maxsim_reference(query, docs)
    return sorted(range(len(docs)), key=lambda i: (-scores[i], f"{i:08d}"))[:k]


def test_imputed_scores_with_every_token_hit_are_exact_maxsim() -> None:
    rng = np.random.default_rng(0)
    docs, tokens, offsets = _corpus(rng, 60, 16)
    query = rng.standard_normal((5, 16)).astype(np.float32)
    sims = query @ tokens.T  # every (query row, token) pair is a hit
    q_rows = np.repeat(np.arange(5), len(tokens))
    tok2doc = np.repeat(np.arange(60), np.diff(offsets))
    got_docs, approx = impute_scores(
        5, q_rows, np.tile(tok2doc, 5), sims.reshape(-1), np.full(5, -10.0, dtype=np.float32)
    )
    np.testing.assert_array_equal(got_docs, np.arange(60))
    np.testing.assert_allclose(approx, maxsim_reference(query, docs), rtol=1e-5, atol=1e-5)


def test_imputed_value_fills_missing_query_rows() -> None:
    # doc 7 has a hit for row 0 only; row 1 gets the imputed similarity.
    docs, approx = impute_scores(
        2,
        np.array([0, 0, 1]),
        np.array([7, 7, 3]),
        np.array([0.5, 0.9, 0.4], dtype=np.float32),
        np.array([0.1, 0.2], dtype=np.float32),
    )
    assert list(docs) == [3, 7]
    np.testing.assert_allclose(approx, [0.1 + 0.4, 0.9 + 0.2], rtol=1e-6)


def test_length_shift_raises_long_documents_missing_similarities() -> None:
    from shard.search import IMPUTE_LENGTH, _length_shift

    shift = _length_shift(np.array([16, 64], dtype=np.int64))
    assert shift[1] > 0 > shift[0] and abs(float(shift.sum())) < 1e-6  # centred
    np.testing.assert_allclose(shift[1] - shift[0], IMPUTE_LENGTH * np.log(4), rtol=1e-5)
    # Same hit for both documents on row 0, none on row 1: the longer one (doc 9) ranks first,
    # by its shift × row 1's spread.
    spread = np.array([0.0, 0.5], dtype=np.float32)
    docs, approx = impute_scores(
        2,
        np.array([0, 0]),
        np.array([3, 9]),
        np.array([0.5, 0.5], dtype=np.float32),
        np.array([0.1, 0.2], dtype=np.float32),
        (shift, spread),
    )
    assert list(docs) == [3, 9]
    np.testing.assert_allclose(
        approx, [0.5 + 0.2 + shift[0] * 0.5, 0.5 + 0.2 + shift[1] * 0.5], rtol=1e-6
    )
    # A hit above the shifted imputed value still wins (max).
    _, approx = impute_scores(
        1,
        np.array([0]),
        np.array([9]),
        np.array([0.9], dtype=np.float32),
        np.array([0.1], dtype=np.float32),
        (np.array([0.5], dtype=np.float32), np.array([0.2], np.float32)),
    )
    np.testing.assert_allclose(approx, [0.9], rtol=1e-6)


def test_candidates_scale_with_shard_size_above_the_reference() -> None:
    from shard.search import scaled_candidates

    # At or below 640k tokens / 20k objects: as given (also for tiny shards).
    assert scaled_candidates(512, 300, 635_300, 20_000, 0.6) == (512, 300)
    assert scaled_candidates(512, 300, 1_000, 10, 0.6) == (512, 300)
    # 10× larger: ~4× (10 ** 0.6 = 3.98).
    k, r = scaled_candidates(512, 300, 6_400_000, 200_000, 0.6)
    assert (k, r) == (math.ceil(512 * 10**0.6), math.ceil(300 * 10**0.6))
    assert 2000 < k < 2100 and 1150 < r < 1250
    # Tokens and objects scale separately; exponent 0 and rerank 0 (re-score all) stay put.
    assert scaled_candidates(512, 300, 6_400_000, 20_000, 0.6)[1] == 300
    assert scaled_candidates(512, 300, 6_400_000, 200_000, 0.0) == (512, 300)
    assert scaled_candidates(512, 0, 6_400_000, 200_000, 0.6)[1] == 0


def test_kprime_covering_every_token_gives_the_exact_ranking() -> None:
    rng = np.random.default_rng(1)
    docs, tokens, offsets = _corpus(rng, 300, 16)
    view = _view(tokens, offsets)
    for _ in range(10):
        query = rng.standard_normal((6, 16)).astype(np.float32)
        for k in (1, 10):
            hits = search_segments(
                [view],
                "v",
                query,
                k,
                allowed=[None],
                k_prime=len(tokens),
                rerank_docs=max(4 * k, 1),
            )
            assert hits[0].n_candidates == max(4 * k, 1)  # only these were re-scored
            assert list(hits[0].rows) == _exact_ranking(query, docs, k)
            np.testing.assert_allclose(
                hits[0].scores, maxsim_reference(query, docs)[hits[0].rows], rtol=1e-5
            )


def test_rerank_recall_floor_and_fewer_rescored_documents() -> None:
    """Two indexed segments + one exact one; k' well below the token count. Imputation must
    keep recall@10 close to re-scoring every candidate, with far fewer exact re-scores. (It
    needs a deeper k' than the union does: here k' 48 re-scoring the whole union of ~300
    candidates reaches 0.95, but only ~0.7 re-scoring the best 60 of them.)"""
    rng = np.random.default_rng(2)
    docs, tokens, offsets = _corpus(rng, 1200, 32, n_centers=60)
    parts = [(0, 500), (500, 1000), (1000, 1200)]
    views = []
    for j, (a, b) in enumerate(parts):
        off = offsets[a : b + 1] - offsets[a]
        views.append(_view(tokens[offsets[a] : offsets[b]], off, indexed=j < 2))
    recalls: dict[int, list[float]] = {0: [], 60: []}
    rescored: dict[int, list[int]] = {0: [], 60: []}
    for _ in range(20):
        target = docs[int(rng.integers(len(docs)))]
        query = target[rng.integers(0, len(target), 8)] + 0.3 * rng.standard_normal((8, 32))
        query = query.astype(np.float32)
        want = set(_exact_ranking(query, docs, 10))
        for rerank in recalls:
            out = search_segments(
                views, "v", query, 10, allowed=[None] * 3, k_prime=192, rerank_docs=rerank
            )
            found = {parts[j][0] + int(r) for j, h in enumerate(out) for r in h.rows}
            scores = sorted(
                (
                    (float(s), parts[j][0] + int(r))
                    for j, h in enumerate(out)
                    for r, s in zip(h.rows, h.scores, strict=True)
                ),
                reverse=True,
            )
            top = {i for _, i in scores[:10]}
            assert top <= found
            recalls[rerank].append(len(want & top) / 10)
            rescored[rerank].append(sum(h.n_candidates for h in out[:2]))
    assert np.mean(recalls[0]) >= 0.95
    assert np.mean(recalls[60]) >= 0.95  # measured 0.995 (union: 1.0 with ~720 candidates)
    assert max(rescored[60]) <= 60 < np.mean(rescored[0]) / 5


def test_filters_and_tombstones_keep_the_imputed_path_exact_enough() -> None:
    """Ineligible documents never come back, with imputation on."""
    rng = np.random.default_rng(3)
    docs, tokens, offsets = _corpus(rng, 400, 16)
    view = _view(tokens, offsets)
    allow = np.zeros(400, dtype=np.bool_)
    allow[::3] = True
    deleted = np.zeros(400, dtype=np.bool_)
    deleted[::6] = True  # half of the allowed ones
    view = SegmentView(view.segment, view.n_objects, deleted, view.vectors)
    old = search_mod.EXACT_FILTER_MAX_OBJECTS
    search_mod.EXACT_FILTER_MAX_OBJECTS = 10  # force the index path
    try:
        query = rng.standard_normal((4, 16)).astype(np.float32)
        out = search_segments(
            [view], "v", query, 10, allowed=[allow], k_prime=len(tokens), rerank_docs=40
        )
    finally:
        search_mod.EXACT_FILTER_MAX_OBJECTS = old
    rows = list(out[0].rows)
    assert all(allow[r] and not deleted[r] for r in rows)
    eligible = [i for i in range(400) if allow[i] and not deleted[i]]
    scores = maxsim_reference(query, [docs[i] for i in eligible])
    want = [eligible[i] for i in sorted(range(len(eligible)), key=lambda i: -scores[i])[:10]]
    assert rows == want


def test_light_tombstones_never_return_deleted_documents() -> None:
    """Few tombstones: no deeper probing, but deleted documents are still never returned and the
    live top 10 is exact when k' covers every token."""
    rng = np.random.default_rng(4)
    docs, tokens, offsets = _corpus(rng, 300, 16)
    view = _view(tokens, offsets)
    deleted = np.zeros(300, dtype=np.bool_)
    query = rng.standard_normal((4, 16)).astype(np.float32)
    scores = maxsim_reference(query, docs)
    deleted[np.argsort(-scores)[:5]] = True  # the five best are gone
    deleted[rng.choice(300, 20, replace=False)] = True
    view = SegmentView(view.segment, view.n_objects, deleted, view.vectors)
    out = search_segments(
        [view], "v", query, 10, allowed=[None], k_prime=len(tokens), rerank_docs=40
    )
    live = [i for i in np.argsort(-scores, kind="stable") if not deleted[i]]
    assert list(out[0].rows) == live[:10]


def test_in_steps_equals_one_call_and_checks_the_deadline(monkeypatch: Any) -> None:
    """With a deadline, exact MaxSim runs in steps of at most CHECK_MACS multiply-adds (split
    by documents and by query rows) and gives the same scores; a passed deadline stops it
    between steps."""
    import pytest

    from cluster.errors import DeadlineExceeded
    from shard.search import Deadline, in_steps

    rng = np.random.default_rng(3)
    docs, tokens, offsets = _corpus(rng, 60, 16)
    docs[7] = docs[7][:0]  # an empty document stays -inf
    tokens = np.concatenate(docs)
    offsets = np.zeros(61, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    query = rng.standard_normal((37, 16)).astype(np.float32)
    expected = maxsim_reference(query, docs)
    flat = search_mod._flat_range(tokens, offsets)
    calls: list[tuple[int, int, int]] = []

    def counted(q: Any, lo: int, hi: int) -> Any:
        calls.append((len(q), lo, hi))
        return flat(q, lo, hi)

    lengths = np.diff(offsets)

    def steps(deadline: Any) -> Any:
        return in_steps(query, len(lengths), lambda: lengths, deadline, counted)

    np.testing.assert_allclose(steps(Deadline()), expected, rtol=1e-5)
    assert len(calls) == 1  # no deadline: one call
    monkeypatch.setattr(search_mod, "CHECK_MACS", 16 * 16 * 8)  # tiny steps
    calls.clear()
    far = Deadline.after(60.0)
    np.testing.assert_allclose(steps(far), expected, rtol=1e-5)
    assert len(calls) > 10
    assert all(
        n_q * int(lengths[lo:hi].sum()) * 16 <= 16 * 16 * 8 or hi - lo == 1 for n_q, lo, hi in calls
    )
    with pytest.raises(DeadlineExceeded):
        steps(Deadline.after(-1.0))


def test_search_segments_stops_at_its_deadline() -> None:
    import pytest

    from cluster.errors import DeadlineExceeded
    from shard.search import Deadline

    rng = np.random.default_rng(4)
    _, tokens, offsets = _corpus(rng, 200, 16)
    view = _view(tokens, offsets, indexed=False)
    query = rng.standard_normal((8, 16)).astype(np.float32)
    kwargs: dict[str, Any] = {"allowed": [None], "k_prime": 32}
    assert search_segments([view], "v", query, 5, deadline=Deadline.after(60.0), **kwargs)
    with pytest.raises(DeadlineExceeded):
        search_segments([view], "v", query, 5, deadline=Deadline.after(-1.0), **kwargs)
