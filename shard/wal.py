"""Write-ahead log: every acknowledged upsert/delete batch, replayed on open.

Files ``wal-<generation>.log`` in one directory. Each file is a sequence of records::

    u64 payload length | u32 crc32(payload) | payload
    payload = u8 op (1 upsert, 2 delete) | u32 header length | header JSON | binary blocks

An upsert's header holds the uuids, the properties and, per named vector, ``[name, dim, n_rows]``;
the binary blocks are then, per vector, the ``int64`` offsets followed by the ``float32`` rows.
A record is one batch, so a batch is durable (and replayed) entirely or not at all.

Torn tails: a record cut short (crash mid-write) or with a bad CRC ends the file; replay logs a
warning and truncates the file there, so later appends never sit behind garbage.

Generations: sealing the growing segment *rotates* the log (appends go to a new generation);
once the sealed segment and the manifest naming the new generation are durable, older
generations are removed. Replay reads every generation from the manifest's one upward, so a
crash anywhere in between loses nothing.

Failed appends (disk full, file size limit, I/O error): the record is written with ``pwrite`` at
the known end of the file (no user-space buffer that could flush stale bytes later), and on any
error the file is cut back to that end, so a failed write leaves nothing behind and the writer
is told it failed (``StorageError`` / ``InsufficientStorage``). If even the cut fails, the file is
abandoned: the next append opens a new generation, and replay drops the abandoned file's torn
tail and goes on with the next generation, so no later acknowledged record sits behind garbage.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cluster.errors import InsufficientStorage, StorageError
from cluster.types import ObjectBatch, VectorColumn
from shard.codec import encode_json, fsync_dir

logger = logging.getLogger(__name__)

_RECORD = struct.Struct("<QI")
_HEADER_LEN = struct.Struct("<I")
OP_UPSERT = 1
OP_DELETE = 2
_NAME_RE = re.compile(r"^wal-(\d{12})\.log$")
# errno values that mean "no room": the writer should free space (or raise a limit) and retry.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_error(exc: OSError, what: str, details: dict[str, Any] | None = None) -> StorageError:
    """The colshard error for an ``OSError`` that kept a write from becoming durable."""
    info = {**(details or {}), "errno": exc.errno, "os_error": exc.strerror or str(exc)}
    if exc.errno in NO_SPACE_ERRNOS:
        return InsufficientStorage(
            f"{what}: insufficient storage ({exc.strerror or exc}); the write was not applied, "
            "retry once space is freed",
            info,
        )
    return StorageError(
        f"{what}: storage error ({exc.strerror or exc}); the write was not applied", info
    )


@dataclass(frozen=True)
class WalRecord:
    op: Literal["upsert", "delete"]
    batch: ObjectBatch | None = None
    uuids: tuple[str, ...] = ()


def encode_upsert(batch: ObjectBatch) -> bytes:
    return b"".join(encode_upsert_parts(batch))


def encode_upsert_parts(batch: ObjectBatch) -> list[Any]:
    """The upsert payload as buffers (the vectors' own arrays, not copies of them)."""
    names = sorted(batch.vectors)
    header = {
        "uuids": list(batch.uuids),
        "properties": [dict(p) for p in batch.properties],
        "vectors": [[n, batch.vectors[n].dim, batch.vectors[n].n_rows] for n in names],
    }
    head = encode_json(header).encode()
    parts: list[Any] = [bytes([OP_UPSERT]), _HEADER_LEN.pack(len(head)), head]
    for n in names:
        col = batch.vectors[n]
        parts.append(np.ascontiguousarray(col.offsets, dtype="<i8"))
        parts.append(np.ascontiguousarray(col.values, dtype="<f4"))
    return parts


def encode_delete(uuids: Sequence[str]) -> bytes:
    head = json.dumps({"uuids": list(uuids)}).encode()
    return bytes([OP_DELETE]) + _HEADER_LEN.pack(len(head)) + head


def decode(payload: bytes) -> WalRecord:
    op = payload[0]
    (head_len,) = _HEADER_LEN.unpack_from(payload, 1)
    pos = 1 + _HEADER_LEN.size
    header = json.loads(payload[pos : pos + head_len])
    pos += head_len
    uuids = tuple(header["uuids"])
    if op == OP_DELETE:
        return WalRecord("delete", uuids=uuids)
    if op != OP_UPSERT:
        raise ValueError(f"unknown WAL op {op}")
    vectors: dict[str, VectorColumn] = {}
    for name, dim, n_rows in header["vectors"]:
        offsets = np.frombuffer(payload, dtype="<i8", count=len(uuids) + 1, offset=pos)
        pos += offsets.nbytes
        values = np.frombuffer(payload, dtype="<f4", count=n_rows * dim, offset=pos)
        pos += values.nbytes
        vectors[name] = VectorColumn(
            values.reshape(n_rows, dim).astype(np.float32), offsets.astype(np.int64)
        )
    return WalRecord("upsert", ObjectBatch(uuids, tuple(header["properties"]), vectors))


_IOV_MAX = 1024  # buffers per pwritev call (Linux's IOV_MAX)


def _byte_view(part: Any) -> memoryview:
    """A C-contiguous buffer as flat bytes, without copying it."""
    view = memoryview(part)
    if view.nbytes == 0:
        return memoryview(b"")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _pwrite_all(fd: int, buffers: Sequence[memoryview], offset: int) -> None:
    """Write ``buffers`` (flat byte views) back to back at ``offset``: one ``pwritev`` call
    for the whole record (no concatenated copy of it), continuing after short writes."""
    pending = [b for b in buffers if b.nbytes]
    while pending:
        if hasattr(os, "pwritev"):
            done = os.pwritev(fd, pending[:_IOV_MAX], offset)
        else:  # pragma: no cover - platforms without pwritev
            done = os.pwrite(fd, pending[0], offset)
        offset += done
        while pending and done >= pending[0].nbytes:
            done -= pending[0].nbytes
            pending.pop(0)
        if done:
            pending[0] = pending[0][done:]


def _file_name(generation: int) -> str:
    return f"wal-{generation:012d}.log"


class WriteAheadLog:
    """Append-only record log with generations. Not thread-safe: the engine serialises writers."""

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._size = 0  # end of the last complete record in the open file
        self._abandoned = False  # a failed append could not be rolled back: roll on next append
        self.generation = -1

    def generations(self) -> list[int]:
        found = []
        for entry in os.listdir(self.directory):
            m = _NAME_RE.match(entry)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def path(self, generation: int) -> Path:
        return self.directory / _file_name(generation)

    def replay(self, from_generation: int) -> Iterator[WalRecord]:
        """Records of every generation >= ``from_generation``, oldest first. Torn or corrupt
        tails are logged and truncated away."""
        for gen in self.generations():
            if gen >= from_generation:
                yield from self._replay_file(self.path(gen))

    def _replay_file(self, path: Path) -> Iterator[WalRecord]:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            problem = None
            if len(data) - pos < _RECORD.size:
                problem = "truncated record header"
            else:
                length, crc = _RECORD.unpack_from(data, pos)
                start = pos + _RECORD.size
                if length > len(data) - start:
                    problem = "truncated record"
                elif zlib.crc32(data[start : start + length]) != crc:
                    problem = "bad checksum"
            if problem is not None:
                logger.warning(
                    "WAL %s: %s at byte %d of %d; dropping the tail (never acknowledged)",
                    path,
                    problem,
                    pos,
                    len(data),
                )
                self._truncate(path, pos)
                return
            record = decode(data[start : start + length])
            pos = start + length
            yield record

    def _truncate(self, path: Path, size: int) -> None:
        with open(path, "r+b") as f:
            f.truncate(size)
            if self.fsync:
                os.fsync(f.fileno())

    def open(self, min_generation: int) -> None:
        """Append to the newest generation >= ``min_generation`` (creating it if none)."""
        gens = [g for g in self.generations() if g >= min_generation]
        self._open_generation(gens[-1] if gens else min_generation)

    def _open_generation(self, generation: int) -> None:
        """Make ``generation`` the file appended to. On failure the current file stays open."""
        path = self.path(generation)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if created and self.fsync:
                fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self._fd, self._size, self.generation = fd, size, generation
        self._abandoned = False

    def append(self, payload: bytes | Sequence[Any]) -> None:
        """Write one record and (with ``fsync``) make it durable, or raise ``OSError`` having
        written nothing that replay would see. ``payload``: bytes, or the buffers (bytes,
        C-contiguous arrays) that concatenated form it; they are written as they are (one
        ``pwritev``), never copied into one record first."""
        if self._abandoned:
            logger.warning(
                "WAL %s: continuing in a new generation after a failed append",
                self.path(self.generation),
            )
            self._open_generation(self.generation + 1)
        fd = self._fd
        assert fd is not None, "WAL not open"
        parts: Sequence[Any] = [payload] if isinstance(payload, bytes) else payload
        views = [_byte_view(part) for part in parts]
        length = crc = 0
        for view in views:
            length += view.nbytes
            crc = zlib.crc32(view, crc)
        record = [memoryview(_RECORD.pack(length, crc)), *views]
        start = self._size
        try:
            _pwrite_all(fd, record, start)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            # Never leave a partial (or not durably written) record in front of later ones.
            try:
                os.ftruncate(fd, start)
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                logger.exception(
                    "WAL %s: could not roll back a failed append; the next append "
                    "starts a new generation",
                    self.path(self.generation),
                )
                self._abandoned = True
            raise
        self._size = start + _RECORD.size + length

    def append_upsert(self, batch: ObjectBatch) -> None:
        self.append(encode_upsert_parts(batch))

    def append_delete(self, uuids: Sequence[str]) -> None:
        self.append(encode_delete(uuids))

    def rotate(self) -> int:
        """Start the next generation; returns it. On failure nothing changes."""
        self._open_generation(self.generation + 1)
        return self.generation

    def size_bytes(self) -> int:
        return 0 if self._fd is None else self._size

    def remove_before(self, generation: int) -> None:
        removed = False
        for gen in self.generations():
            if gen < generation:
                self.path(gen).unlink(missing_ok=True)
                removed = True
        if removed and self.fsync:
            fsync_dir(self.directory)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
