from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shard.maxsim import (
    gather,
    gather_many,
    maxsim_explain,
    maxsim_flat,
    maxsim_reference,
    top_k_order,
    widen,
)


def _flat(docs: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    tokens = np.concatenate(docs) if docs else np.zeros((0, dim), np.float32)
    return tokens.astype(np.float32), offsets


def _ragged(rng: np.random.Generator, n: int, dim: int) -> list[np.ndarray]:
    # Zero-row documents included: they have no vector and must score -inf.
    return [
        rng.standard_normal((int(rng.integers(0, 7)), dim)).astype(np.float32) for _ in range(n)
    ]


def test_vectorised_equals_reference_on_ragged_docs() -> None:
    rng = np.random.default_rng(1)
    docs = _ragged(rng, 200, 16)
    tokens, offsets = _flat(docs, 16)
    query = rng.standard_normal((5, 16)).astype(np.float32)
    got = maxsim_flat(query, tokens, offsets)
    want = maxsim_reference(query, docs)
    empty = np.array([len(d) == 0 for d in docs])
    assert empty.any() and not empty.all()
    assert np.all(np.isneginf(got[empty]))
    np.testing.assert_allclose(got[~empty], want[~empty], rtol=1e-5, atol=1e-5)


def test_chunking_does_not_change_scores() -> None:
    rng = np.random.default_rng(2)
    docs = _ragged(rng, 100, 8)
    tokens, offsets = _flat(docs, 8)
    query = rng.standard_normal((3, 8)).astype(np.float32)
    whole = maxsim_flat(query, tokens, offsets)
    for chunk in (1, 5, 17):
        np.testing.assert_allclose(
            maxsim_flat(query, tokens, offsets, chunk_tokens=chunk), whole, rtol=1e-5, atol=1e-5
        )


def test_float16_tokens_are_scored_as_float32() -> None:
    rng = np.random.default_rng(3)
    docs = [d.astype(np.float16) for d in _ragged(rng, 50, 8)]
    tokens, offsets = _flat([d.astype(np.float32) for d in docs], 8)
    query = rng.standard_normal((4, 8)).astype(np.float32)
    got = maxsim_flat(query, tokens.astype(np.float16), offsets)
    want = maxsim_reference(query, docs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_widen_equals_numpys_float16_cast_for_every_finite_value() -> None:
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = values[np.isfinite(values)].reshape(-1, 8)  # subnormals, ±0 and ±65504 included
    got = widen(finite)
    assert got.dtype == np.float32 and got.shape == finite.shape
    assert np.array_equal(got.view(np.uint32), finite.astype(np.float32).view(np.uint32))
    strided = finite[::3, 1::2]  # not contiguous: copied first
    assert np.array_equal(
        widen(strided).view(np.uint32), strided.astype(np.float32).view(np.uint32)
    )
    f32 = np.ones((2, 3), dtype=np.float32)
    assert widen(f32) is f32
    assert widen(np.ones((2, 3))).dtype == np.float32


def test_gather_picks_the_right_rows() -> None:
    rng = np.random.default_rng(4)
    docs = _ragged(rng, 30, 4)
    tokens, offsets = _flat(docs, 4)
    pick = np.array([7, 0, 29, 3, 3], dtype=np.int64)
    got, got_offsets = gather(tokens, offsets, pick)
    for j, i in enumerate(pick):
        np.testing.assert_array_equal(got[got_offsets[j] : got_offsets[j + 1]], docs[i])


def test_gather_many_concatenates_the_parts_rows() -> None:
    rng = np.random.default_rng(6)
    a_docs, b_docs = _ragged(rng, 20, 4), _ragged(rng, 10, 4)
    a, b = _flat(a_docs, 4), _flat(b_docs, 4)
    picks = [
        np.array([3, 0, 19], dtype=np.int64),
        np.zeros(0, dtype=np.int64),
        np.array([9, 9], dtype=np.int64),
    ]
    got, lengths = gather_many([(*a, picks[0]), (*b, picks[1]), (*b, picks[2])], 4, np.float32)
    want = [a_docs[i] for i in picks[0]] + [b_docs[i] for i in picks[2]]
    assert lengths.dtype == np.int64 and list(lengths) == [len(d) for d in want]
    np.testing.assert_array_equal(got, np.concatenate(want))
    empty, none = gather_many([], 4, np.float16)
    assert empty.shape == (0, 4) and empty.dtype == np.float16 and len(none) == 0


def test_single_vector_maxsim_is_the_dot_product() -> None:
    rng = np.random.default_rng(5)
    docs = [rng.standard_normal((1, 6)).astype(np.float32) for _ in range(10)]
    tokens, offsets = _flat(docs, 6)
    q = rng.standard_normal((1, 6)).astype(np.float32)
    np.testing.assert_allclose(maxsim_flat(q, tokens, offsets), (tokens @ q[0]), rtol=1e-6)


def test_top_k_order_score_desc_then_key_asc() -> None:
    scores = np.array([1.0, 3.0, 3.0, -np.inf, 2.0, 3.0])
    keys = ["f", "c", "a", "z", "b", "b"]
    order = top_k_order(scores, 4, keys.__getitem__)
    assert [keys[i] for i in order] == ["a", "b", "c", "b"]
    assert list(order) == [2, 5, 1, 4]
    # Ties at the cut are decided by key, not by position.
    assert [keys[i] for i in top_k_order(scores, 2, keys.__getitem__)] == ["a", "b"]
    assert len(top_k_order(scores, 10, keys.__getitem__)) == 5  # -inf never returned
    assert len(top_k_order(scores, 0, keys.__getitem__)) == 0


def test_explain_names_the_best_doc_token() -> None:
    doc = np.array([[1, 0], [0, 1], [0.5, 0.5]], dtype=np.float32)
    query = np.array([[0, 2], [3, 0]], dtype=np.float32)
    assert maxsim_explain(query, doc) == [
        {"query_token": 0, "doc_token": 1, "sim": 2.0},
        {"query_token": 1, "doc_token": 0, "sim": 3.0},
    ]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=12),
    n_query=st.integers(1, 4),
    dim=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_property_matches_reference(lengths: list[int], n_query: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    docs = [rng.standard_normal((n, dim)).astype(np.float32) for n in lengths]
    tokens, offsets = _flat(docs, dim)
    query = rng.standard_normal((n_query, dim)).astype(np.float32)
    got = maxsim_flat(query, tokens, offsets, chunk_tokens=int(rng.integers(1, 20)))
    want = maxsim_reference(query, docs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
