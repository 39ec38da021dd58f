"""Property tests (hypothesis) for WAL replay: any sequence of upserts, deletes and rotations
replays exactly, per generation; a log cut at any byte replays a prefix of its records and
takes appends again."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.types import ObjectBatch, VectorColumn
from shard.wal import WalRecord, WriteAheadLog

ids = st.text(alphabet="0123456789abcdef-", min_size=1, max_size=12)
prop_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63) + 1, 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.lists(st.text(max_size=8), max_size=4),
)
properties = st.dictionaries(st.text(min_size=1, max_size=8), prop_values, max_size=4)


@st.composite
def batches(draw: st.DrawFn) -> ObjectBatch:
    uuids = draw(st.lists(ids, min_size=1, max_size=5, unique=True))
    props = tuple(draw(properties) for _ in uuids)
    vectors = {}
    for name in draw(st.lists(st.sampled_from(["mv", "one", "zz"]), unique=True, max_size=2)):
        dim = draw(st.integers(1, 4))
        mats: list[Any] = []
        for _ in uuids:
            n = draw(st.integers(0, 3))
            rows = draw(
                st.lists(st.floats(-1e3, 1e3, width=32), min_size=n * dim, max_size=n * dim)
            )
            mats.append(None if n == 0 else np.asarray(rows, dtype=np.float32).reshape(n, dim))
        vectors[name] = VectorColumn.from_matrices(mats, dim)
    return ObjectBatch(tuple(uuids), props, vectors)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), batches()),
        st.tuples(st.just("delete"), st.lists(ids, min_size=1, max_size=4).map(tuple)),
        st.tuples(st.just("rotate"), st.none()),
    ),
    max_size=12,
)


def same(a: WalRecord, op: str, payload: Any) -> bool:
    if a.op != op:
        return False
    if op == "delete":
        return a.uuids == payload
    got, want = a.batch, payload
    assert got is not None
    if got.uuids != want.uuids or got.properties != want.properties:
        return False
    if sorted(got.vectors) != sorted(want.vectors):
        return False
    return all(
        np.array_equal(got.vectors[n].values, want.vectors[n].values)
        and np.array_equal(got.vectors[n].offsets, want.vectors[n].offsets)
        for n in want.vectors
    )


def write(directory: Path, ops: list[tuple[str, Any]]) -> list[tuple[int, str, Any]]:
    """Apply ``ops``; return (generation, op, payload) of every record written."""
    wal = WriteAheadLog(directory, fsync=False)
    wal.open(0)
    written = []
    for op, payload in ops:
        if op == "rotate":
            wal.rotate()
        elif op == "upsert":
            wal.append_upsert(payload)
            written.append((wal.generation, op, payload))
        else:
            wal.append_delete(payload)
            written.append((wal.generation, op, payload))
    wal.close()
    return written


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_replay_returns_every_record_in_order(ops: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        written = write(Path(tmp), ops)
        wal = WriteAheadLog(Path(tmp), fsync=False)
        replayed = list(wal.replay(0))
        assert len(replayed) == len(written)
        assert all(same(r, op, p) for r, (_, op, p) in zip(replayed, written, strict=True))
        for gen in wal.generations():
            tail = [(op, p) for g, op, p in written if g >= gen]
            again = list(wal.replay(gen))
            assert len(again) == len(tail)
            assert all(same(r, op, p) for r, (op, p) in zip(again, tail, strict=True))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("upsert"), batches()),
            st.tuples(st.just("delete"), st.lists(ids, min_size=1, max_size=3).map(tuple)),
        ),
        min_size=1,
        max_size=6,
    ),
    st.floats(0.0, 1.0),
)
def test_a_cut_at_any_byte_replays_a_prefix(ops: list[tuple[str, Any]], where: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        written = write(directory, ops)
        path = WriteAheadLog(directory, fsync=False).path(0)
        data = path.read_bytes()
        cut = int(where * len(data))
        path.write_bytes(data[:cut])
        replayed = list(WriteAheadLog(directory, fsync=False).replay(0))
        assert len(replayed) <= len(written)
        assert all(same(r, op, p) for r, (_, op, p) in zip(replayed, written, strict=False))
        if cut == len(data):
            assert len(replayed) == len(written)
        # The torn tail is gone; an append lands behind the last good record.
        wal = WriteAheadLog(directory, fsync=False)
        wal.open(0)
        wal.append_delete(("after",))
        wal.close()
        again = list(WriteAheadLog(directory, fsync=False).replay(0))
        assert len(again) == len(replayed) + 1 and again[-1].uuids == ("after",)
