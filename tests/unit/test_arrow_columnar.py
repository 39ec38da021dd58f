"""The Arrow import's columnar fast path gives what the per-object path gives: the same stored
batch (byte for byte) and, for invalid input, the very same error."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from cluster import limits
from cluster.errors import ColshardError, InvalidInput
from cluster.settings import Settings
from cluster.spec import CollectionSpec
from cluster.types import VectorColumn
from cluster.validation import ColumnarInput, prepare_batch, prepare_columnar
from gateway.arrow_import import batch_from_arrow, objects_from_arrow
from gateway.client import _distinct_ids
from shard.wal import WriteAheadLog, encode_upsert, encode_upsert_parts

DIM = 8


def spec(metric: str = "cosine", single: bool = False, dtype: str = "float32") -> CollectionSpec:
    vectors = [{"name": "mv", "kind": "multi", "dim": DIM, "metric": metric, "dtype": dtype}]
    if single:
        vectors.append({"name": "sv", "kind": "single", "dim": DIM, "metric": metric})
    return CollectionSpec.from_dict(
        {
            "name": "Col",
            "properties": [
                {"name": "title", "data_type": "text"},
                {"name": "year", "data_type": "int"},
            ],
            "vectors": vectors,
            "shard_count": 2,
        }
    )


def ids(n: int) -> list[str]:
    return [str(uuid.UUID(int=(i + 1) * 0x9E3779B97F4A7C15 << 32)) for i in range(n)]


def multi(rows: list[Any]) -> pa.Array:
    return pa.array(rows, type=pa.list_(pa.list_(pa.float32())))


def table(n: int = 6, *, seed: int = 0, single: bool = False, **overrides: Any) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {
        "id": pa.array(ids(n)),
        "title": pa.array([f"doc {i}" for i in range(n)]),
        "year": pa.array([2000 + i for i in range(n)], type=pa.int64()),
        "vectors.mv": multi(
            [rng.normal(size=(int(rng.integers(1, 5)), DIM)).tolist() for _ in range(n)]
        ),
    }
    if single:
        cols["sv"] = pa.array(
            [rng.normal(size=DIM).tolist() for _ in range(n)], type=pa.list_(pa.float32())
        )
    cols.update(overrides)
    return pa.table(cols)


def body(t: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, t.schema) as writer:
        writer.write_table(t)
    return sink.getvalue()


def both(s: CollectionSpec, t: pa.Table) -> tuple[Any, Any]:
    """(columnar result or error, per-object result or error)."""
    raw = body(t)
    out = []
    for fast in (True, False):
        try:
            if fast:
                cols = batch_from_arrow(raw)
                assert isinstance(cols, ColumnarInput)
                out.append(prepare_columnar(s, cols))
            else:
                out.append(prepare_batch(s, objects_from_arrow(raw)))
        except ColshardError as exc:
            out.append((type(exc), exc.message, dict(exc.details)))
    return out[0], out[1]


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("single", [False, True])
def test_same_batch_byte_for_byte(metric: str, single: bool) -> None:
    fast, slow = both(spec(metric, single), table(single=single))
    assert fast.uuids == slow.uuids and fast.properties == slow.properties
    assert set(fast.vectors) == set(slow.vectors)
    for name in fast.vectors:
        assert fast.vectors[name].values.tobytes() == slow.vectors[name].values.tobytes()
        assert np.array_equal(fast.vectors[name].offsets, slow.vectors[name].offsets)


def test_rows_without_ids_get_fresh_uuids() -> None:
    cols = batch_from_arrow(body(table(3, id=pa.array([None, ids(1)[0], None], type=pa.string()))))
    assert isinstance(cols, ColumnarInput)
    batch = prepare_columnar(spec(), cols)
    assert batch.uuids[1] == ids(1)[0] and len(set(batch.uuids)) == 3


BAD: dict[str, dict[str, Any]] = {
    "wrong dim": {"vectors.mv": multi([[[0.5] * 4]] * 6)},
    "nan": {"vectors.mv": multi([[[0.5] * DIM]] * 5 + [[[float("nan")] * DIM]])},
    "inf": {"vectors.mv": multi([[[0.5] * DIM]] * 3 + [[[float("inf")] + [0.0] * 7]] * 3)},
    "empty row": {"vectors.mv": multi([[[0.5] * DIM]] * 2 + [[]] + [[[0.5] * DIM]] * 3)},
    "missing vector": {"vectors.mv": multi([[[0.5] * DIM]] * 4 + [None, [[0.5] * DIM]])},
    "unknown vector": {"other": multi([[[0.5] * DIM]] * 6)},
    "bad property": {"year": pa.array(["x"] * 6)},
    "unknown property": {"color": pa.array(["red"] * 6)},
    "duplicate id": {"id": pa.array(ids(5) + ids(1))},
    "invalid id": {"id": pa.array([*ids(5), "not-a-uuid"])},
    "single for multi": {"vectors.mv": pa.array([[0.5] * DIM] * 6, type=pa.list_(pa.float32()))},
    "ragged": {"vectors.mv": multi([[[0.5] * DIM, [0.5] * 3]] * 6)},
    "mixed dims": {"vectors.mv": multi([[[0.5] * DIM]] * 5 + [[[0.5] * 3]])},
    "null token": {"vectors.mv": multi([[[0.5] * DIM]] * 5 + [[None]])},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_same_error(case: str) -> None:
    raw = body(table(**BAD[case]))
    errors = []
    for decode in (batch_from_arrow, objects_from_arrow):
        with pytest.raises(InvalidInput) as info:
            decoded = decode(raw)
            if isinstance(decoded, ColumnarInput):
                prepare_columnar(spec(), decoded)
            else:
                prepare_batch(spec(), decoded)
        errors.append((info.value.message, dict(info.value.details)))
    assert errors[0] == errors[1]


def test_float16_range_same_error_and_same_batch() -> None:
    """A float16 dot vector must fit float16 (a value ≥ 65520 would be stored as Inf): the
    columnar path and the per-object path reject the same object; 65504 is kept."""
    f16 = spec("dot", dtype="float16")
    too_big = {"vectors.mv": multi([[[0.5] * DIM]] * 4 + [[[7e4] + [0.0] * 7]] * 2)}
    fast, slow = both(f16, table(**too_big))
    assert fast == slow
    assert fast[0] is InvalidInput and "float16" in fast[1] and fast[2]["index"] == 4
    fits = {"vectors.mv": multi([[[65504.0] + [-65504.0] * 7]] * 6)}
    fast, slow = both(f16, table(**fits))
    assert fast.vectors["mv"].values.tobytes() == slow.vectors["mv"].values.tobytes()
    # the same values are fine for a float32 vector, and cosine rows are unit length anyway
    for ok in (spec("dot"), spec("cosine", dtype="float16")):
        fast, slow = both(ok, table(**too_big))
        assert fast.vectors["mv"].values.tobytes() == slow.vectors["mv"].values.tobytes()


def test_limits_name_the_same_object() -> None:
    settings = Settings(max_tokens_per_object=3, max_dim=64)
    rows = [[[0.5] * DIM]] * 2 + [[[0.5] * DIM] * 4] * 4
    raw = body(table(**{"vectors.mv": multi(rows)}))
    messages = []
    for decode in (batch_from_arrow, objects_from_arrow):
        with pytest.raises(InvalidInput) as info:
            limits.check_objects(decode(raw), settings)
        messages.append(info.value.message)
    assert messages[0] == messages[1] and "objects[2].vectors.mv" in messages[0]
    limits.check_objects(batch_from_arrow(body(table())), Settings())  # within limits


def test_take_matches_per_object_gather() -> None:
    rng = np.random.default_rng(1)
    mats = [rng.normal(size=(k, DIM)).astype(np.float32) for k in (2, 0, 3, 1)]
    col = VectorColumn.from_matrices(mats, DIM)
    for idx in ([2, 0], [1], [3, 2, 1, 0], [0, 1, 2, 3], []):
        got = col.take(idx)
        want = VectorColumn.from_matrices([mats[i] for i in idx], DIM)
        assert np.array_equal(got.values, want.values)
        assert np.array_equal(got.offsets, want.offsets)


def test_wal_parts_are_the_same_record(tmp_path: Path) -> None:
    cols = batch_from_arrow(body(table()))
    assert isinstance(cols, ColumnarInput)
    batch = prepare_columnar(spec(), cols)
    assert b"".join(encode_upsert_parts(batch)) == encode_upsert(batch)
    wal = WriteAheadLog(tmp_path, fsync=True)
    wal.open(0)
    wal.append_upsert(batch)
    wal.append(encode_upsert(batch))
    wal.close()
    records = list(WriteAheadLog(tmp_path, fsync=True).replay(0))
    assert len(records) == 2
    for rec in records:
        assert rec.batch is not None and rec.batch.uuids == batch.uuids
        assert rec.batch.vectors["mv"].values.tobytes() == batch.vectors["mv"].values.tobytes()


def test_distinct_ids() -> None:
    assert _distinct_ids(pa.table({"x": [1, 2]}))
    assert _distinct_ids(pa.table({"id": pa.array([*ids(3), None, None])}))
    assert not _distinct_ids(pa.table({"id": pa.array([ids(1)[0], ids(1)[0].upper()])}))
    assert not _distinct_ids(pa.table({"id": pa.array(["nope"])}))
