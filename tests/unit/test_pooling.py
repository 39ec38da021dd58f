"""Server-side token pooling (cluster.pooling) and its spec."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cluster.errors import InvalidInput
from cluster.pooling import WINDOW, pool_batch, pool_tokens
from cluster.spec import NamedVectorSpec, PoolingSpec
from cluster.types import ObjectBatch, VectorColumn
from shard.maxsim import maxsim_reference
from tests.unit.test_shard_support import make_spec


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pooling_keeps_ceil_n_over_factor_cluster_means() -> None:
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((5, 16)))
    # 5 tight groups of 4 tokens: factor 4 must find them
    tokens = _unit(np.repeat(centres, 4, axis=0) + 0.01 * rng.standard_normal((20, 16)))
    pooled = pool_tokens(tokens, 4, cosine=True)
    assert pooled.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-5)
    # in the order of their first token: group i's mean is row i
    np.testing.assert_allclose(pooled, centres, atol=0.02)
    assert pool_tokens(tokens, 3, cosine=True).shape == (7, 16)  # ceil(20 / 3)
    assert pool_tokens(tokens, 1, cosine=True) is tokens
    assert pool_tokens(tokens[:1], 4, cosine=True).shape == (1, 16)
    assert pool_tokens(tokens, 4, cosine=True, min_tokens=20) is tokens


def test_dot_metric_means_are_not_renormalised_and_pooling_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((40, 8)).astype(np.float32) * 3
    a = pool_tokens(tokens, 2, cosine=False)
    b = pool_tokens(tokens.copy(), 2, cosine=False)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20, 8)
    # cluster means of the raw rows: not unit length, and the rows' weighted average is kept
    assert not np.allclose(np.linalg.norm(a, axis=1), 1.0)
    assert (a.min(axis=0) >= tokens.min(axis=0) - 1e-5).all()
    assert (a.max(axis=0) <= tokens.max(axis=0) + 1e-5).all()


def test_long_objects_pool_window_by_window() -> None:
    rng = np.random.default_rng(2)
    tokens = _unit(rng.standard_normal((WINDOW + 10, 8)))
    pooled = pool_tokens(tokens, 2, cosine=True)
    assert pooled.shape[0] == WINDOW // 2 + 5


def test_pooled_maxsim_stays_close_to_the_full_one() -> None:
    rng = np.random.default_rng(3)
    centres = _unit(rng.standard_normal((60, 32)))
    # like text or page patches, an object repeats itself: 30 tokens close to 6 of its own
    # "concepts" (cosine ~0.93 between two tokens of one concept: what pooling merges)
    docs = []
    for _ in range(200):
        own = centres[rng.choice(60, 6, replace=False)]
        docs.append(_unit(own[rng.integers(0, 6, 30)] + 0.05 * rng.standard_normal((30, 32))))
    pooled = [pool_tokens(d, 2, cosine=True) for d in docs]
    assert sum(len(p) for p in pooled) == 15 * len(docs)
    recalls = []
    for i in range(0, 200, 10):
        q = _unit(docs[i][:8] + 0.05 * rng.standard_normal((8, 32)))
        full_scores, pooled_scores = maxsim_reference(q, docs), maxsim_reference(q, pooled)
        # pooled scores move by < 0.1 per query token here
        assert np.abs(full_scores - pooled_scores).max() / len(q) < 0.1
        full, pool = np.argsort(-full_scores)[:10], np.argsort(-pooled_scores)[:10]
        recalls.append(len(set(full) & set(pool)) / 10)
        assert pool[0] == i  # the known item stays first
    assert np.mean(recalls) >= 0.9


def test_pool_batch_touches_only_pooled_vectors() -> None:
    spec = make_spec(
        [
            {"name": "p", "kind": "multi", "dim": 4, "pooling": {"factor": 2}},
            {"name": "q", "kind": "multi", "dim": 4},
        ]
    )
    rng = np.random.default_rng(4)
    mats = [_unit(rng.standard_normal((n, 4))) for n in (6, 1, 9)]
    batch = ObjectBatch(
        ("a", "b", "c"),
        ({}, {}, {}),
        {
            "p": VectorColumn.from_matrices([mats[0], None, mats[2]], 4),
            "q": VectorColumn.from_matrices(mats, 4),
        },
    )
    out = pool_batch(spec, batch)
    assert out.vectors["p"].lengths().tolist() == [3, 0, 5]
    assert out.vectors["q"] is batch.vectors["q"]
    assert out.uuids == batch.uuids


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"factor": 0}, "factor"),
        ({"factor": 17}, "factor"),
        ({"factor": 2.0}, "factor"),
        ({"factor": 2, "min_tokens": -1}, "min_tokens"),
        ({"factor": 2, "mode": "ward"}, "mode"),
        ("2", "pooling must be"),
    ],
)
def test_bad_pooling_is_rejected(raw: Any, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        NamedVectorSpec.from_dict({"name": "v", "dim": 8, "pooling": raw})


def test_pooling_spec_round_trip_and_single_vectors() -> None:
    v = NamedVectorSpec.from_dict({"name": "v", "dim": 8, "pooling": {"factor": 3}})
    assert v.pooling == PoolingSpec(3, 0)
    assert NamedVectorSpec.from_dict(v.to_dict()) == v
    with pytest.raises(InvalidInput, match="multi-vectors only"):
        NamedVectorSpec.from_dict(
            {"name": "s", "dim": 8, "kind": "single", "pooling": {"factor": 2}}
        )
