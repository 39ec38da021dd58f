from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from shard.index import (
    COARSE_SCAN_SHARE,
    ScannTokenIndex,
    choose_params,
    coarse_scan_factor,
    default_leaves_to_search,
)


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((32, dim)).astype(np.float32)
    x = centers[rng.integers(0, 32, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def test_params_follow_segment_size() -> None:
    small, large = choose_params(2_000), choose_params(640_000)
    assert small.num_leaves < large.num_leaves
    assert 1 <= small.leaves_to_search <= small.num_leaves
    assert choose_params(100_000).num_leaves == 316  # ≈ sqrt(n) up to 400 leaves
    assert large.num_leaves == 400  # then 400 up to 640k tokens, then sqrt(n) / 2
    assert choose_params(6_400_000).num_leaves == 1_265
    assert small.training_sample_size <= 2_000
    assert small.reorder == "none"  # the engine re-scores documents exactly itself
    # 5-dim blocks: 26 codes + a 4-byte leaf id per 128-d token (≤ 36 bytes/token).
    assert large.dims_per_block == 5 and choose_params(2_000, dim=32).dims_per_block == 2
    custom = choose_params(10_000, {"num_leaves": 50, "leaves_to_search": 7})
    assert (custom.num_leaves, custom.leaves_to_search) == (50, 7)
    assert (
        choose_params(
            10_000, {"num_leaves": 200, "leaves_to_search_fraction": 0.5}
        ).leaves_to_search
        == 100
    )


def test_default_leaves_to_search_schedule() -> None:
    # 5 % up to 400 leaves (at least 4), above that 0.7·sqrt(leaves) once that is more.
    assert [default_leaves_to_search(n) for n in (10, 100, 224, 400, 800, 2_525, 10_000)] == [
        4,
        5,
        12,
        20,
        20,
        36,
        70,
    ]
    values = [default_leaves_to_search(n) for n in range(1, 20_000)]
    assert values == sorted(values)  # never fewer leaves for a larger segment


def test_larger_leaves_scan_a_smaller_share_of_tokens() -> None:
    """Above 400 leaves the partition is coarser than √n, and a query token searches the share
    of the tokens the √n partition would, times ``coarse_scan_factor``: 20 of 800 leaves = 10 of
    400 at √n, × 0.6 = 6 of 400 (640k tokens)."""
    assert choose_params(640_000).leaves_to_search == 6
    assert choose_params(6_400_000).leaves_to_search == 11  # 36 of √n = 2,530, × 1,265/2,530 × 0.6
    assert choose_params(100_000).leaves_to_search == 16  # 5 % of 316: unchanged
    assert choose_params(160_000).leaves_to_search == 20  # √n = 400 leaves: unchanged
    for n in range(150_000, 8_000_000, 50_000):
        p = choose_params(n)
        ref = round(n**0.5)
        share = p.leaves_to_search / p.num_leaves
        expected = default_leaves_to_search(ref) / ref * coarse_scan_factor(p.num_leaves, ref)
        assert abs(share - expected) <= 0.5 / p.num_leaves + 1e-9, n
    # an explicit num_leaves at √n or finer keeps the √n share
    assert choose_params(640_000, {"num_leaves": 1_600}).leaves_to_search == 40


def test_coarse_scan_factor_is_continuous() -> None:
    assert coarse_scan_factor(400, 400) == 1.0 and coarse_scan_factor(800, 400) == 1.0
    assert coarse_scan_factor(400, 800) == pytest.approx(COARSE_SCAN_SHARE)
    assert coarse_scan_factor(1_265, 3_000) == pytest.approx(COARSE_SCAN_SHARE)
    values = [coarse_scan_factor(400, ref) for ref in range(400, 900)]
    assert values == sorted(values, reverse=True)  # falls with the leaf size, never jumps
    assert max(a - b for a, b in itertools.pairwise(values)) < 0.01


def test_finds_near_duplicates() -> None:
    db = _clustered(5_000, 32)
    index = ScannTokenIndex.build(db, 10, {})
    ids, sims = index.search(db[:50], 10)
    assert ids.shape == sims.shape == (50, 10)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # best first
    # Each query token is itself in the database: the quantized scores find it nearly always.
    assert np.mean([i in row for i, row in enumerate(ids)]) >= 0.9
    # Approximate inner products, but close to the exact ones.
    exact = np.einsum("qd,qkd->qk", db[:50], db[ids])
    assert np.abs(sims - exact).max() < 0.25
    # With exact re-ordering inside ScaNN (an option) a token finds itself first unless the
    # approximate stages (tree, AH shortlist) missed it; the scores it returns are exact.
    exact_index = ScannTokenIndex.build(db, 10, {"reorder": "float32"})
    ids, sims = exact_index.search(db[:50], 10)
    assert np.mean(ids[:, 0] == np.arange(50)) >= 0.95
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", db[:50], db[ids]), atol=1e-5)


def test_serialize_rename_load(tmp_path: Path) -> None:
    db = _clustered(3_000, 16, seed=1)
    index = ScannTokenIndex.build(db, 8, {})
    tmp = tmp_path / "index.tmp"
    tmp.mkdir()
    index.serialize(tmp)
    final = tmp_path / "index"
    os.rename(tmp, final)  # relative asset paths: the directory may move
    loaded = ScannTokenIndex.load(final)
    assert loaded.n_tokens == 3_000 and loaded.params == index.params
    np.testing.assert_array_equal(loaded.search(db[:5], 8)[0], index.search(db[:5], 8)[0])


def test_k_larger_than_the_index_returns_no_padding() -> None:
    db = _clustered(64, 8, seed=2)
    index = ScannTokenIndex.build(db, 200, {})
    ids, sims = index.search(db[:3], 200)
    assert ids.shape == (3, 64)  # k capped at the index size
    valid = ids >= 0
    assert np.all(np.isfinite(sims[valid])) and np.all(np.isneginf(sims[~valid]))
    assert ids[valid].max() < 64


def test_builds_are_reproducible() -> None:
    """The same tokens always give the same index (ScaNN's random k-means initialisation is not
    seeded; k-means++ is): replicas and rebuilds of a segment rank alike."""
    db = _clustered(6_000, 32)
    q = db[:50] + 0.01
    a = ScannTokenIndex.build(db, 20, {}).search(q, 20)
    b = ScannTokenIndex.build(db, 20, {}).search(q, 20)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
