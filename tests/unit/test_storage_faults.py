"""Disk full and I/O errors, and compaction under concurrent queries.

The file-size-limit tests run the engine in a child process with ``RLIMIT_FSIZE`` lowered and
SIGXFSZ ignored, so its writes fail with a real ``EFBIG`` from the kernel (partial writes
included) -- the same path as ``ENOSPC`` on a full disk. The parent then reopens the data dir
without the limit and checks that exactly the acknowledged writes are there, byte-equal, and that
the WAL replays without a torn record.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import pickle
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import InsufficientStorage, StorageError
from cluster.types import VectorSearch
from gateway.errors import status_for
from shard import wal as wal_mod
from shard.engine import ShardEngine
from shard.wal import WriteAheadLog, storage_error
from tests.unit.test_shard_support import (
    batch,
    drain,
    exact_top,
    make_spec,
    open_engine,
    random_docs,
    uid,
)

DIM = 8
FSIZE_LIMIT = 96 * 1024
SPEC_PROPS = [{"name": "n", "data_type": "int"}]  # no text property: no BM25 files


def _spec() -> Any:
    return make_spec(properties=SPEC_PROPS)


def _run_child(target: Any, *args: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=target, args=args)
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0, f"child exited with {proc.exitcode}"


def _limit_file_size(limit: int) -> tuple[int, int]:
    """Lower RLIMIT_FSIZE (writes past it fail with EFBIG); returns the old limits."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    return old


def _save(out: Path, written: dict[str, np.ndarray], log: list[Any]) -> None:
    np.savez(out / "vectors.npz", **written)
    (out / "log.json").write_text(json.dumps(log))


def _load(out: Path) -> tuple[dict[str, np.ndarray], list[Any]]:
    with np.load(out / "vectors.npz") as z:
        written = {k: z[k] for k in z.files}
    return written, json.loads((out / "log.json").read_text())


# --------------------------------------------------------------------------- WAL full


def _wal_full_child(root: str, out: str) -> None:
    """Writes big and small batches against a file size limit, then without it, and "crashes"
    (exits without closing). Logs what was acknowledged and what failed, with which code."""
    rng = np.random.default_rng(7)
    engine = open_engine(Path(root), _spec(), fsync=True)
    old = _limit_file_size(FSIZE_LIMIT)
    written: dict[str, np.ndarray] = {}
    log: list[Any] = []
    next_id = 0
    for step in range(24):
        big = step % 3 != 2  # two big batches (~30 KB each), then a small one (~200 B)
        n, lo, hi = (20, 40, 50) if big else (1, 1, 2)
        ids = list(range(next_id, next_id + n))
        next_id += n
        docs = random_docs(rng, n, DIM, lo, hi)
        written.update({uid(i): d for i, d in zip(ids, docs, strict=True)})
        try:
            engine.upsert(batch(ids, {"v": docs}, [{"n": i} for i in ids]))
            log.append(["upsert", [uid(i) for i in ids], "ok"])
        except StorageError as exc:
            assert isinstance(exc, InsufficientStorage), exc
            assert exc.details["errno"] == errno.EFBIG
            log.append(["upsert", [uid(i) for i in ids], exc.code])
    failed_small = 0
    for _ in range(5000):  # small writes until even those no longer fit, and a few more
        docs = random_docs(rng, 1, DIM, 1, 2)
        written[uid(next_id)] = docs[0]
        try:
            engine.upsert(batch([next_id], {"v": docs}, [{"n": next_id}]))
            log.append(["upsert", [uid(next_id)], "ok"])
        except InsufficientStorage as exc:
            log.append(["upsert", [uid(next_id)], exc.code])
            failed_small += 1
        next_id += 1
        if failed_small == 3:
            break
    acked = [u for op, us, res in log if res == "ok" for u in us]
    try:  # a delete while full: acknowledged or refused, never half-done
        engine.delete(acked[:3])
        log.append(["delete", acked[:3], "ok"])
    except InsufficientStorage as exc:
        log.append(["delete", acked[:3], exc.code])
    assert engine.count() == len(acked) - (3 if log[-1][2] == "ok" else 0)
    resource.setrlimit(resource.RLIMIT_FSIZE, old)  # space is back
    for _ in range(3):
        ids = list(range(next_id, next_id + 20))
        next_id += 20
        docs = random_docs(rng, 20, DIM, 40, 50)
        written.update({uid(i): d for i, d in zip(ids, docs, strict=True)})
        engine.upsert(batch(ids, {"v": docs}, [{"n": i} for i in ids]))
        log.append(["upsert", [uid(i) for i in ids], "ok"])
    _save(Path(out), written, log)
    os._exit(0)  # a crash: no close, no checkpoint


def test_wal_append_at_file_size_limit_fails_cleanly_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _run_child(_wal_full_child, str(tmp_path), str(tmp_path))
    written, log = _load(tmp_path)
    results = [res for _, _, res in log]
    first_fail = results.index("insufficient_storage")
    # Some writes were refused, and writes that fit still succeeded after a refusal: the
    # failed append left no partial record in front of them.
    assert results.count("insufficient_storage") >= 7
    assert sum(1 for _, us, res in log if len(us) == 1 and res != "ok") == 3  # small ones too
    assert "ok" in results[first_fail + 1 : -3]
    live: dict[str, np.ndarray] = {}
    for op, uuids, res in log:
        if res != "ok":
            continue
        for u in uuids:
            if op == "upsert":
                live[u] = written[u]
            else:
                live.pop(u, None)
    with caplog.at_level(logging.WARNING, logger="shard.wal"):
        engine = open_engine(tmp_path, _spec())
    assert not [r for r in caplog.records if "dropping the tail" in r.message]
    try:
        assert engine.count() == len(live)
        for u, vec in live.items():
            got = engine.get(u, include_vectors=True)
            assert got is not None and got.vectors is not None, u
            assert got.vectors["v"].tobytes() == vec.tobytes()
        refused = {u for _, us, res in log if res != "ok" for u in us} - set(live)
        assert all(engine.get(u) is None for u in refused)
    finally:
        engine.close()


# --------------------------------------------------------------------------- seal fails


def _seal_full_child(root: str, out: str) -> None:
    """The WAL fits, the segment being sealed does not: the seal fails, the engine keeps
    serving and accepting (small) writes; once the limit is lifted the seal is retried."""
    rng = np.random.default_rng(8)
    engine = open_engine(Path(root), _spec(), fsync=True, seal_threshold_tokens=1000)
    written: dict[str, np.ndarray] = {}
    log: list[Any] = []
    for start in range(0, 40, 10):  # ~1.4k tokens, ~45 KB of vectors in WAL generation 0
        docs = random_docs(rng, 10, DIM, 30, 40)
        written.update({uid(start + j): d for j, d in enumerate(docs)})
        engine.upsert(batch(range(start, start + 10), {"v": docs}))
        log.append(["upsert", [uid(i) for i in range(start, start + 10)], "ok"])
    old = _limit_file_size(16 * 1024)
    seg_dir = Path(root) / "shard" / "segments"
    for _ in range(2):  # the first try and a retry fail alike
        try:
            engine.maintenance()
            raise AssertionError("the seal should have failed")
        except OSError as exc:
            assert exc.errno == errno.EFBIG
        assert os.listdir(seg_dir) == [], "a failed seal must remove its partial files"
    assert engine.count() == 40 and engine.stats().n_segments == 1  # the frozen one, served
    for i in range(40, 45):  # small writes still fit in the new WAL generation
        docs = random_docs(rng, 1, DIM, 1, 2)
        written[uid(i)] = docs[0]
        engine.upsert(batch([i], {"v": docs}))
        log.append(["upsert", [uid(i)], "ok"])
    engine.delete([uid(3)])
    log.append(["delete", [uid(3)], "ok"])
    assert engine.stats().n_segments == 2  # frozen + growing
    q = rng.standard_normal((2, DIM)).astype(np.float32)
    live = {u: written[u] for u in written if u != uid(3)}
    got = [h.uuid for h in engine.search(VectorSearch("v", q, 10)).hits]
    assert got == [u for u, _ in exact_top(q, live, 10)]
    wal_dir = Path(root) / "shard" / "wal"
    assert len(os.listdir(wal_dir)) == 2  # generation 0 is kept until the seal succeeds
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    assert engine.maintenance()  # the retry succeeds
    assert len(os.listdir(seg_dir)) == 1 and len(os.listdir(wal_dir)) == 1
    _save(Path(out), written, log)
    os._exit(0)  # crash after the seal


def test_failed_seal_keeps_the_wal_and_is_retried_once_space_is_back(tmp_path: Path) -> None:
    _run_child(_seal_full_child, str(tmp_path), str(tmp_path))
    written, log = _load(tmp_path)
    live = {u: written[u] for _, us, _ in log for u in us}
    live.pop(uid(3))
    engine = open_engine(tmp_path, _spec(), seal_threshold_tokens=1000)
    try:
        assert engine.count() == len(live)
        assert engine.get(uid(3)) is None
        for u, vec in live.items():
            got = engine.get(u, include_vectors=True)
            assert got is not None and got.vectors is not None
            assert got.vectors["v"].tobytes() == vec.tobytes()
        assert "exact=1" in engine.stats().index_state["v"]  # one sealed segment
    finally:
        engine.close()


# --------------------------------------------------------------------------- injected faults


def test_failed_rollback_moves_appends_to_a_new_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A write cut short (half the record on disk, then ENOSPC) whose rollback also fails:
    the file is abandoned and the next append goes to a new generation; replay drops the torn
    tail and keeps every acknowledged record on both sides of it."""
    rng = np.random.default_rng(1)
    wal = WriteAheadLog(tmp_path, fsync=True)
    wal.open(0)
    wal.append_upsert(batch([0], {"v": random_docs(rng, 1, DIM)}))
    real_pwrite = os.pwrite

    def half_then_full(fd: int, buffers: Any, offset: int) -> int:
        data = b"".join(bytes(b) for b in buffers)  # the record, written with one pwritev
        if len(data) > 1:
            real_pwrite(fd, data[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    def broken_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(wal_mod.os, "pwritev", half_then_full)
    monkeypatch.setattr(wal_mod.os, "ftruncate", broken_truncate)
    with pytest.raises(OSError):
        wal.append_upsert(batch([1], {"v": random_docs(rng, 1, DIM)}))
    monkeypatch.undo()
    assert wal.generation == 0
    wal.append_upsert(batch([2], {"v": random_docs(rng, 1, DIM)}))
    assert wal.generation == 1
    wal.close()
    with caplog.at_level(logging.WARNING, logger="shard.wal"):
        records = list(WriteAheadLog(tmp_path, fsync=True).replay(0))
    assert [r.batch.uuids for r in records if r.batch] == [(uid(0),), (uid(2),)]
    assert any("dropping the tail" in r.message for r in caplog.records)


def test_engine_write_on_full_disk_is_refused_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(2)
    engine = open_engine(tmp_path, _spec())
    engine.upsert(batch([0, 1], {"v": random_docs(rng, 2, DIM)}))

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal_mod.os, "pwrite", full)
    monkeypatch.setattr(wal_mod.os, "pwritev", full)
    with pytest.raises(InsufficientStorage) as info:
        engine.upsert(batch([2], {"v": random_docs(rng, 1, DIM)}))
    assert info.value.details["shard"] == 0 and "insufficient storage" in info.value.message
    with pytest.raises(InsufficientStorage):
        engine.delete([uid(0)])
    assert engine.count() == 2 and engine.get(uid(0)) is not None and engine.get(uid(2)) is None
    monkeypatch.undo()
    engine.upsert(batch([2], {"v": random_docs(rng, 1, DIM)}))
    engine.delete([uid(0)])
    engine.close()
    engine = open_engine(tmp_path, _spec())
    assert sorted(o.uuid for o in engine.list_objects(None, 10)) == [uid(1), uid(2)]
    engine.close()


def test_storage_errors_map_to_507_and_503_and_cross_process_boundaries() -> None:
    full = storage_error(OSError(errno.ENOSPC, "No space left on device"), "shard X:0")
    quota = storage_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "shard X:0")
    io = storage_error(OSError(errno.EIO, "Input/output error"), "shard X:0", {"shard": 0})
    assert isinstance(full, InsufficientStorage) and isinstance(quota, InsufficientStorage)
    assert type(io) is StorageError and io.details["shard"] == 0
    assert (full.code, status_for(full)) == ("insufficient_storage", 507)
    assert (io.code, status_for(io)) == ("storage_error", 503)
    again = pickle.loads(pickle.dumps(full))  # as it crosses a Ray actor boundary
    assert type(again) is InsufficientStorage and again.details == full.details


# --------------------------------------------------------------------------- compaction


def test_compaction_is_invisible_to_concurrent_queries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries running while segments are merged (before, during and after the swap, while
    the source files are removed) always return the exact ranking of the live objects at that
    time; deletes and replaces that land mid-merge carry over into the merged segment."""
    rng = np.random.default_rng(11)
    spec = make_spec()
    docs = random_docs(rng, 160, DIM)
    engine = open_engine(tmp_path, spec, seal_threshold_tokens=100)
    live = {uid(i): d for i, d in enumerate(docs)}
    for start in range(0, 160, 40):  # four sealed segments
        engine.upsert(batch(range(start, start + 40), {"v": docs[start : start + 40]}))
        while engine._maybe_seal():
            pass
    engine.close()  # reopened with a higher threshold, the four are small: merge candidates
    engine = open_engine(tmp_path, spec, seal_threshold_tokens=1000)
    gone = [uid(i) for i in range(0, 160, 4)]
    engine.delete(gone)
    for u in gone:
        live.pop(u)
    queries = [rng.standard_normal((3, DIM)).astype(np.float32) for _ in range(3)]

    def expected(state: dict[str, np.ndarray]) -> list[list[str]]:
        return [[u for u, _ in exact_top(q, state, 15)] for q in queries]

    # Expected rankings by generation. A writer appends the next generation, then writes, then
    # commits it; a query may return any generation from the one committed when it started to
    # the last one appended when it ended.
    gens = [expected(live)]
    committed = [0]
    errors: list[str] = []
    stop = threading.Event()
    n_done = [0, 0]

    def searcher(t: int) -> None:
        try:
            while not stop.is_set():
                for qi, q in enumerate(queries):
                    first = committed[0]
                    res = engine.search(VectorSearch("v", q, 15))
                    got = [h.uuid for h in res.hits]
                    if all(got != g[qi] for g in gens[first:]):
                        errors.append(f"query {qi}: {got} not in generations >= {first}")
                    n_done[t] += 1
        except Exception as exc:  # surfaced by wait_for_queries / the final check
            errors.append(f"query raised {exc!r}")

    def wait_for_queries(n: int) -> None:
        target = [d + n for d in n_done]
        deadline = time.monotonic() + 60
        while any(d < t for d, t in zip(n_done, target, strict=True)):
            assert not errors, errors[:2]
            assert time.monotonic() < deadline, "queries stalled"
            time.sleep(0.001)

    real_write_merged = ShardEngine._write_merged
    merges = [0]

    def slow_write_merged(self: ShardEngine, segment_id: int, sources: Any, **kwargs: Any) -> Any:
        wait_for_queries(10)  # queries against the sources
        merged = real_write_merged(self, segment_id, sources, **kwargs)
        wait_for_queries(10)  # merged segment on disk, not yet swapped in
        # Writes that land mid-merge: a delete and a replace of objects being merged.
        victims = [uid(i) for i in range(1, 160, 4)][merges[0] * 2 : merges[0] * 2 + 2]
        live.pop(victims[0])
        gens.append(expected(live))
        self.delete(victims[:1])
        committed[0] = len(gens) - 1
        new = random_docs(rng, 1, DIM)[0]
        live[victims[1]] = new
        gens.append(expected(live))
        self.upsert(batch([int(victims[1][-12:], 16)], {"v": [new]}))
        committed[0] = len(gens) - 1
        wait_for_queries(10)
        merges[0] += 1
        return merged

    monkeypatch.setattr(ShardEngine, "_write_merged", slow_write_merged)
    n_before = engine.stats().n_segments
    threads = [threading.Thread(target=searcher, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    try:
        assert drain(engine) >= 1
        wait_for_queries(10)  # after the swap and the removal of the sources
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert merges[0] >= 1 and engine.stats().n_segments < n_before
    assert [
        [h.uuid for h in engine.search(VectorSearch("v", q, 15)).hits] for q in queries
    ] == expected(live)
    assert engine.count() == len(live)
    engine.close()
    engine = open_engine(tmp_path, spec, seal_threshold_tokens=1000)
    assert [
        [h.uuid for h in engine.search(VectorSearch("v", q, 15)).hits] for q in queries
    ] == expected(live)
    engine.close()
