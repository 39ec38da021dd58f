from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pytest

from cluster.types import ObjectBatch, VectorColumn
from shard.wal import WriteAheadLog


def _batch(ids: list[str], seed: int = 0) -> ObjectBatch:
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal((i % 3 + 1, 4)).astype(np.float32) for i in range(len(ids))]
    mats[0] = None  # type: ignore[call-overload]  # an object without this vector
    return ObjectBatch(
        tuple(ids),
        tuple({"title": f"t{i}", "tags": ["a", "é"], "n": i} for i in range(len(ids))),
        {"v": VectorColumn.from_matrices(mats, 4)},
    )


def _records(wal: WriteAheadLog, gen: int = 0) -> list:  # type: ignore[type-arg]
    return list(wal.replay(gen))


def test_roundtrip_upserts_and_deletes(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=True)
    wal.open(0)
    b = _batch(["a", "b", "c"])
    wal.append_upsert(b)
    wal.append_delete(["b"])
    wal.close()
    recs = _records(WriteAheadLog(tmp_path, fsync=True))
    assert [r.op for r in recs] == ["upsert", "delete"]
    got = recs[0].batch
    assert got.uuids == b.uuids and got.properties == b.properties
    np.testing.assert_array_equal(got.vectors["v"].values, b.vectors["v"].values)
    np.testing.assert_array_equal(got.vectors["v"].offsets, b.vectors["v"].offsets)
    assert recs[1].uuids == ("b",)


def test_dates_are_stored_as_iso_strings(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.open(0)
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    wal.append_upsert(ObjectBatch(("a",), ({"d": when},), {}))
    wal.close()
    (rec,) = _records(WriteAheadLog(tmp_path, fsync=False))
    assert rec.batch.properties[0] == {"d": "2024-05-01T12:00:00+00:00"}


def test_generations_rotate_and_trim(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.open(0)
    wal.append_delete(["x"])
    assert wal.rotate() == 1
    wal.append_delete(["y"])
    assert [r.uuids for r in wal.replay(0)] == [("x",), ("y",)]
    assert [r.uuids for r in wal.replay(1)] == [("y",)]
    wal.remove_before(1)
    assert wal.generations() == [1]
    wal.close()
    again = WriteAheadLog(tmp_path, fsync=False)
    again.open(0)
    assert again.generation == 1  # appends continue in the newest generation
    again.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_torn_tail_is_logged_and_truncated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.open(0)
    wal.append_upsert(_batch(["a", "b"]))
    good_size = wal.size_bytes()
    wal.append_upsert(_batch(["c", "d"], seed=1))
    wal.close()
    path = wal.path(0)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 5]
    elif damage == "flip":
        data[-3] ^= 0xFF
    else:
        data = data[:good_size] + b"\x07\x00"
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="shard.wal"):
        recs = _records(WriteAheadLog(tmp_path, fsync=False))
    assert [r.batch.uuids for r in recs] == [("a", "b")]
    assert any("dropping the tail" in r.message for r in caplog.records)
    assert path.stat().st_size == good_size

    # Appends after recovery land behind the last good record and replay fine.
    wal2 = WriteAheadLog(tmp_path, fsync=False)
    wal2.open(0)
    wal2.append_delete(["a"])
    wal2.close()
    assert [r.op for r in _records(WriteAheadLog(tmp_path, fsync=False))] == ["upsert", "delete"]


def test_empty_file_replays_nothing(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.open(0)
    wal.close()
    assert _records(WriteAheadLog(tmp_path, fsync=False)) == []
