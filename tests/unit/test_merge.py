from __future__ import annotations

import random

import pytest

from cluster.types import Hit
from coordinator.merge import hit_key, merge_top_k


def hits(*pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(u, s) for u, s in pairs]


def test_merge_orders_by_score_then_uuid() -> None:
    a = hits(("b", 3.0), ("d", 1.0))
    c = hits(("a", 3.0), ("c", 2.0))
    out = merge_top_k([a, c], 0, 10)
    assert [h.uuid for h in out] == ["a", "b", "c", "d"]


def test_offset_applied_once_not_per_shard() -> None:
    # Each shard returned offset+limit hits; a per-shard offset would drop "b" and "c".
    s0 = hits(("a", 10.0), ("b", 9.0), ("e", 1.0))
    s1 = hits(("c", 8.0), ("d", 7.0), ("f", 0.5))
    out = merge_top_k([s0, s1], 2, 2)
    assert [h.uuid for h in out] == ["c", "d"]


def test_dedupe_keeps_best() -> None:
    out = merge_top_k([hits(("x", 5.0)), hits(("x", 4.0), ("y", 3.0))], 0, 10)
    assert [(h.uuid, h.score) for h in out] == [("x", 5.0), ("y", 3.0)]


def test_limit_and_empty_inputs() -> None:
    assert merge_top_k([], 0, 5) == []
    assert merge_top_k([[], []], 0, 5) == []
    assert len(merge_top_k([hits(*[(str(i), float(i)) for i in range(20)])], 0, 5)) == 5
    with pytest.raises(ValueError):
        merge_top_k([], -1, 5)


def test_merge_equals_global_sort_randomised() -> None:
    rng = random.Random(7)
    for _ in range(200):
        everything = [Hit(f"{i:04d}", float(rng.randint(0, 20))) for i in range(60)]
        rng.shuffle(everything)
        shards = [sorted(everything[i::3], key=hit_key) for i in range(3)]
        offset, limit = rng.randint(0, 20), rng.randint(1, 20)
        expected = sorted(everything, key=hit_key)[offset : offset + limit]
        got = merge_top_k([s[: offset + limit] for s in shards], offset, limit)
        assert [h.uuid for h in got] == [h.uuid for h in expected]
