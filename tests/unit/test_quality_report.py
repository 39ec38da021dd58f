"""The recall report's request checks and sample split (coordinator.quality); the report
itself is tested end to end in tests/integration/test_quality.py."""

from __future__ import annotations

import pytest

from cluster.errors import InvalidInput, NotFound
from cluster.spec import CollectionSpec
from coordinator.quality import MAX_QUERIES, _shares, check_request


def _spec(*vectors: dict[str, object]) -> CollectionSpec:
    return CollectionSpec.from_dict(
        {"name": "Q", "properties": [], "vectors": list(vectors), "shard_count": 2}
    )


def test_request_defaults_and_limits() -> None:
    one = _spec(
        {
            "name": "v",
            "kind": "multi",
            "dim": 4,
            "index": {"kind": "scann", "options": {"recall_k": 100}},
        }
    )
    assert check_request(one, None, None, 50) == ("v", 100)  # the vector's recall_k
    assert check_request(one, "v", 10, 1) == ("v", 10)
    for k, n in ((0, 10), (1_001, 10), (10, 0), (10, MAX_QUERIES + 1)):
        with pytest.raises(InvalidInput):
            check_request(one, "v", k, n)
    with pytest.raises(NotFound):
        check_request(one, "w", None, 10)
    two = _spec({"name": "a", "kind": "multi", "dim": 4}, {"name": "b", "kind": "multi", "dim": 4})
    with pytest.raises(InvalidInput, match="several named vectors"):
        check_request(two, None, None, 10)
    assert check_request(two, "b", None, 10) == ("b", 10)


def test_samples_follow_the_shards_objects() -> None:
    assert _shares({0: 300, 1: 100}, 40) == {0: 30, 1: 10}
    assert _shares({0: 1_000, 1: 1, 2: 0}, 10) == {0: 10, 1: 1}  # an empty shard asks none
    assert _shares({0: 0}, 10) == {}
