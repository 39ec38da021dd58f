"""coordinator.fusion: worked examples, Weaviate's edge cases, and properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import InvalidInput
from coordinator.fusion import RRF_K, FusedHit, FusionKind, fuse

KW = [("a", 9.0), ("b", 5.0), ("c", 1.0)]
VEC = [("c", 0.9), ("d", 0.8), ("a", 0.5)]


def ids(hits: list[FusedHit]) -> list[str]:
    return [h.uuid for h in hits]


# ------------------------------------------------------------------ worked examples


def test_ranked_fusion_formula() -> None:
    hits = fuse(KW, VEC, alpha=0.5, fusion="ranked")
    expected = {
        "a": 0.5 / 60 + 0.5 / 62,
        "b": 0.5 / 61,
        "c": 0.5 / 62 + 0.5 / 60,
        "d": 0.5 / 61,
    }
    assert {h.uuid: h.score for h in hits} == pytest.approx(expected)
    assert ids(hits) == ["a", "c", "b", "d"]  # a and c tie exactly: uuid decides; b, d too
    a = hits[0]
    assert (a.keyword_rank, a.vector_rank, a.keyword_score, a.vector_score) == (0, 2, 9.0, 0.5)
    b = hits[2]
    assert (b.uuid, b.keyword_rank, b.vector_rank, b.keyword_score, b.vector_score) == (
        "b",
        1,
        None,
        5.0,
        None,
    )


def test_ranked_fusion_weights() -> None:
    hits = {h.uuid: h.score for h in fuse(KW, VEC, alpha=0.75, fusion="ranked")}
    assert hits["a"] == pytest.approx(0.25 / RRF_K + 0.75 / (RRF_K + 2))
    assert hits["d"] == pytest.approx(0.75 / (RRF_K + 1))


def test_relative_score_formula() -> None:
    hits = fuse(KW, VEC, alpha=0.25, fusion="relative_score")
    # keyword: a 1, b 0.5, c 0; vector: c 1, d 0.75, a 0
    expected = {"a": 0.75, "b": 0.375, "c": 0.25, "d": 0.25 * 0.75}
    assert {h.uuid: h.score for h in hits} == pytest.approx(expected)
    assert ids(hits) == ["a", "b", "c", "d"]


def test_relative_score_single_and_equal_lists() -> None:
    # Weaviate: when min == max (one hit, or all equal) every hit gets the list's full weight.
    hits = fuse([("k", 3.0)], [("v", 0.1), ("w", 0.1)], alpha=0.6, fusion="relative_score")
    assert {h.uuid: h.score for h in hits} == pytest.approx({"k": 0.4, "v": 0.6, "w": 0.6})
    assert ids(hits) == ["v", "w", "k"]
    only = fuse([("k", -2.0)], [], alpha=0.5, fusion="relative_score")
    assert only == [FusedHit("k", 0.5, -2.0, None, 0, None)]


def test_negative_scores_normalise() -> None:
    hits = fuse([], [("x", -1.0), ("y", -3.0), ("z", -2.0)], alpha=1, fusion="relative_score")
    assert [(h.uuid, h.score) for h in hits] == [("x", 1.0), ("y", 0.0), ("z", 0.5)]


def test_extreme_scores_stay_finite() -> None:
    hits = fuse([("a", 1.7e308), ("b", -1.7e308)], [("c", 1.0)], alpha=0.5, fusion="relative_score")
    assert [(h.uuid, h.score) for h in hits] == [("a", 0.5), ("c", 0.5), ("b", 0.0)]


def test_alpha_zero_and_one_ignore_the_other_list() -> None:
    fusions: tuple[FusionKind, ...] = ("ranked", "relative_score")
    for fusion in fusions:
        kw_only = fuse(KW, VEC, alpha=0, fusion=fusion)
        assert ids(kw_only) == ["a", "b", "c"]
        assert all(h.vector_rank is None and h.vector_score is None for h in kw_only)
        vec_only = fuse(KW, VEC, alpha=1, fusion=fusion)
        assert ids(vec_only) == ["c", "d", "a"]
        assert all(h.keyword_rank is None for h in vec_only)


def test_duplicates_keep_first_entry() -> None:
    hits = fuse([("a", 1.0), ("b", 0.5), ("a", 0.1)], [], alpha=0, fusion="ranked")
    assert [(h.uuid, h.keyword_rank, h.keyword_score) for h in hits] == [
        ("a", 0, 1.0),
        ("b", 1, 0.5),
    ]


def test_offset_limit_and_empty() -> None:
    full = fuse(KW, VEC, alpha=0.5, fusion="ranked")
    assert fuse(KW, VEC, alpha=0.5, fusion="ranked", offset=1, limit=2) == full[1:3]
    assert fuse(KW, VEC, alpha=0.5, fusion="ranked", offset=3) == full[3:]
    assert fuse(KW, VEC, alpha=0.5, fusion="ranked", limit=0) == []
    assert fuse(KW, VEC, alpha=0.5, fusion="ranked", offset=10) == []
    assert fuse([], [], alpha=0.5) == []


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"alpha": "0.5"}, "alpha"),
        ({"fusion": "rrf"}, "fusion"),
        ({"offset": -1}, "negative"),
        ({"limit": -1}, "negative"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], fragment: str) -> None:
    args: dict[str, Any] = {"alpha": 0.5, "fusion": "ranked", **kwargs}
    with pytest.raises(InvalidInput, match=fragment):
        fuse(KW, VEC, **args)


def test_non_finite_scores_are_a_bug() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        fuse([("a", float("nan"))], [], alpha=0.5)


# ------------------------------------------------------------------ properties

UUIDS = st.sampled_from([f"u{i:02d}" for i in range(12)])
SCORES = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, 2.0]))


@st.composite
def top_lists(draw: st.DrawFn) -> list[tuple[str, float]]:
    """A merged shard list: distinct uuids, score desc, ties by uuid."""
    entries = draw(st.dictionaries(UUIDS, SCORES, max_size=8))
    return sorted(entries.items(), key=lambda h: (-h[1], h[0]))


FUSION = st.sampled_from(["ranked", "relative_score"])
PROPS = settings(max_examples=120, deadline=None)


@PROPS
@given(top_lists(), top_lists(), FUSION, st.integers(0, 4), st.none() | st.integers(0, 6))
def test_extreme_alpha_reproduces_one_list(
    kw: list[tuple[str, float]],
    vec: list[tuple[str, float]],
    fusion: Any,
    offset: int,
    limit: int | None,
) -> None:
    end = None if limit is None else offset + limit
    only_kw = fuse(kw, vec, alpha=0.0, fusion=fusion, offset=offset, limit=limit)
    assert [(h.uuid, h.keyword_score) for h in only_kw] == kw[offset:end]
    only_vec = fuse(kw, vec, alpha=1.0, fusion=fusion, offset=offset, limit=limit)
    assert [(h.uuid, h.vector_score) for h in only_vec] == vec[offset:end]


@PROPS
@given(top_lists(), top_lists(), st.floats(0, 1), FUSION)
def test_fused_list_is_sorted_complete_and_bounded(
    kw: list[tuple[str, float]], vec: list[tuple[str, float]], alpha: float, fusion: Any
) -> None:
    hits = fuse(kw, vec, alpha=alpha, fusion=fusion)
    if 0 < alpha < 1:
        keys = [(-h.score, h.uuid) for h in hits]
        assert keys == sorted(keys)
    else:  # one list alone keeps its own order (normalising may merge tiny differences)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
    expected_ids = ({u for u, _ in kw} if alpha < 1 else set()) | (
        {u for u, _ in vec} if alpha > 0 else set()
    )
    assert set(ids(hits)) == expected_ids and len(hits) == len(expected_ids)
    top = 1.0 if fusion == "relative_score" else 1 / RRF_K
    for h in hits:
        assert -1e-12 <= h.score <= top + 1e-12
        if h.keyword_rank is not None:
            assert kw[h.keyword_rank] == (h.uuid, h.keyword_score)
        if h.vector_rank is not None:
            assert vec[h.vector_rank] == (h.uuid, h.vector_score)


@PROPS
@given(
    top_lists(),
    top_lists(),
    st.floats(0, 1),
    FUSION,
    st.integers(0, 5),
    st.none() | st.integers(0, 5),
)
def test_offset_limit_slice_once(
    kw: list[tuple[str, float]],
    vec: list[tuple[str, float]],
    alpha: float,
    fusion: Any,
    offset: int,
    limit: int | None,
) -> None:
    full = fuse(kw, vec, alpha=alpha, fusion=fusion)
    end = None if limit is None else offset + limit
    assert fuse(kw, vec, alpha=alpha, fusion=fusion, offset=offset, limit=limit) == full[offset:end]


@PROPS
@given(top_lists(), top_lists(), st.floats(0, 1), FUSION)
def test_swapping_lists_mirrors_alpha(
    kw: list[tuple[str, float]], vec: list[tuple[str, float]], alpha: float, fusion: Any
) -> None:
    a = {h.uuid: h.score for h in fuse(kw, vec, alpha=alpha, fusion=fusion)}
    b = {h.uuid: h.score for h in fuse(vec, kw, alpha=1 - alpha, fusion=fusion)}
    if 0 < alpha < 1 and 0 < 1 - alpha < 1:
        assert a == pytest.approx(b)


@PROPS
@given(top_lists(), st.floats(0.01, 0.99), FUSION)
def test_same_list_on_both_sides_keeps_its_order(
    kw: list[tuple[str, float]], alpha: float, fusion: Any
) -> None:
    hits = fuse(kw, kw, alpha=alpha, fusion=fusion)
    if fusion == "ranked":  # strictly decreasing reciprocal ranks
        assert ids(hits) == [u for u, _ in kw]
    else:  # ties in the normalised score fall back to uuid, like the input's own ties
        assert sorted(ids(hits)) == sorted(u for u, _ in kw)
