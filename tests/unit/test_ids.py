from __future__ import annotations

import uuid

import pytest

from cluster.errors import InvalidInput
from cluster.ids import (
    ShardId,
    jump_hash,
    normalize_uuid,
    shard_for_uuid,
    validate_collection_name,
)


def test_jump_hash_range_and_single_bucket() -> None:
    assert [jump_hash(k, 1) for k in range(5)] == [0] * 5
    assert all(0 <= jump_hash(k * 7919, 13) < 13 for k in range(1000))
    with pytest.raises(ValueError):
        jump_hash(1, 0)


def test_jump_hash_balance_and_minimal_movement() -> None:
    keys = [uuid.UUID(int=i * 0x9E3779B97F4A7C15 % (1 << 128)).int >> 64 for i in range(20000)]
    counts = [0] * 8
    for k in keys:
        counts[jump_hash(k, 8)] += 1
    assert max(counts) < 1.15 * min(counts)
    moved = sum(1 for k in keys if jump_hash(k, 8) != jump_hash(k, 9))
    # Adding a 9th bucket moves about 1/9 of the keys, and only to the new bucket.
    assert 0.08 < moved / len(keys) < 0.14
    assert all(jump_hash(k, 9) == 8 for k in keys if jump_hash(k, 8) != jump_hash(k, 9))


def test_shard_for_uuid_is_deterministic() -> None:
    u = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    assert shard_for_uuid(u, 4) == shard_for_uuid(u.upper(), 4)
    assert 0 <= shard_for_uuid(u, 4) < 4


@pytest.mark.parametrize("name", ["A", "Demo_Collection", "a" + "b" * 63])
def test_valid_collection_names(name: str) -> None:
    assert validate_collection_name(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "_x", "a-b", "a/b", "../x", "a" * 65, "é"])
def test_invalid_collection_names(name: str) -> None:
    with pytest.raises(InvalidInput):
        validate_collection_name(name)


def test_uuid_normalisation() -> None:
    u = uuid.uuid4()
    assert normalize_uuid(str(u).upper()) == str(u)
    with pytest.raises(InvalidInput):
        normalize_uuid("not-a-uuid")


def test_actor_names() -> None:
    assert ShardId("Demo", 1).actor_name() == "colshard:Demo:1"
    assert ShardId("Demo", 1).actor_name(2) == "colshard:Demo:1:2"
