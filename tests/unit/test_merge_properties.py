"""Property tests (hypothesis) for the coordinator's top-k merge: it equals a global sort with
dedupe-by-best-hit and one offset, and per-shard truncation to offset+limit changes nothing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.types import Hit
from coordinator.merge import hit_key, merge_top_k

UUIDS = [f"{i:04x}" for i in range(40)]
# Few distinct scores: ties (ordered by uuid) are the interesting case.
scores = st.one_of(
    st.integers(-5, 5).map(float), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
)


@st.composite
def shard_lists(draw: st.DrawFn) -> list[list[Hit]]:
    """Per-shard hit lists, each holding an id at most once (a shard stores an object once);
    ids may repeat across shards (replicas, a write racing a query)."""
    n_shards = draw(st.integers(0, 5))
    out = []
    for _ in range(n_shards):
        ids = draw(st.lists(st.sampled_from(UUIDS), unique=True, max_size=15))
        out.append([Hit(u, draw(scores)) for u in ids])
    return out


def reference(per_shard: list[list[Hit]], offset: int, limit: int) -> list[Hit]:
    best: dict[str, Hit] = {}
    for hit in sorted((h for hits in per_shard for h in hits), key=hit_key):
        best.setdefault(hit.uuid, hit)
    return sorted(best.values(), key=hit_key)[offset : offset + limit]


@settings(max_examples=300, deadline=None)
@given(shard_lists(), st.integers(0, 20), st.integers(0, 20))
def test_merge_is_a_global_sort_with_dedupe(
    per_shard: list[list[Hit]], offset: int, limit: int
) -> None:
    got = merge_top_k(per_shard, offset, limit)
    assert got == reference(per_shard, offset, limit)
    assert len(got) <= limit
    assert len({h.uuid for h in got}) == len(got)
    assert [hit_key(h) for h in got] == sorted(hit_key(h) for h in got)


@settings(max_examples=300, deadline=None)
@given(shard_lists(), st.integers(0, 10), st.integers(1, 10))
def test_per_shard_top_offset_plus_limit_is_enough(
    per_shard: list[list[Hit]], offset: int, limit: int
) -> None:
    truncated = [sorted(hits, key=hit_key)[: offset + limit] for hits in per_shard]
    assert merge_top_k(truncated, offset, limit) == merge_top_k(per_shard, offset, limit)


@settings(max_examples=200, deadline=None)
@given(shard_lists(), st.integers(0, 10), st.integers(1, 10))
def test_pages_tile_the_full_order(per_shard: list[list[Hit]], page_size: int, pages: int) -> None:
    """Consecutive pages (offset = k * limit) concatenate to the full ranking, no gap, no dup."""
    size = max(page_size, 1)
    full = merge_top_k(per_shard, 0, size * pages)
    tiled = [h for k in range(pages) for h in merge_top_k(per_shard, k * size, size)]
    assert tiled == full
