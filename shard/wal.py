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
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from cluster.types import ObjectBatch, VectorColumn
from shard.codec import encode_json, fsync_dir

logger = logging.getLogger(__name__)

_RECORD = struct.Struct("<QI")
_HEADER_LEN = struct.Struct("<I")
OP_UPSERT = 1
OP_DELETE = 2
_NAME_RE = re.compile(r"^wal-(\d{12})\.log$")


@dataclass(frozen=True)
class WalRecord:
    op: Literal["upsert", "delete"]
    batch: ObjectBatch | None = None
    uuids: tuple[str, ...] = ()


def encode_upsert(batch: ObjectBatch) -> bytes:
    names = sorted(batch.vectors)
    header = {
        "uuids": list(batch.uuids),
        "properties": [dict(p) for p in batch.properties],
        "vectors": [[n, batch.vectors[n].dim, batch.vectors[n].n_rows] for n in names],
    }
    head = encode_json(header).encode()
    parts = [bytes([OP_UPSERT]), _HEADER_LEN.pack(len(head)), head]
    for n in names:
        col = batch.vectors[n]
        parts.append(np.ascontiguousarray(col.offsets, dtype="<i8").tobytes())
        parts.append(np.ascontiguousarray(col.values, dtype="<f4").tobytes())
    return b"".join(parts)


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
        vectors[name] = VectorColumn(values.reshape(n_rows, dim).astype(np.float32),
                                     offsets.astype(np.int64))
    return WalRecord("upsert", ObjectBatch(uuids, tuple(header["properties"]), vectors))


def _file_name(generation: int) -> str:
    return f"wal-{generation:012d}.log"


class WriteAheadLog:
    """Append-only record log with generations. Not thread-safe: the engine serialises writers."""

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = None
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
                logger.warning("WAL %s: %s at byte %d of %d; dropping the tail (never "
                               "acknowledged)", path, problem, pos, len(data))
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
        path = self.path(generation)
        created = not path.exists()
        self._file = open(path, "ab")  # noqa: SIM115 - held open for appends
        self.generation = generation
        if created and self.fsync:
            fsync_dir(self.directory)

    def append(self, payload: bytes) -> None:
        f = self._file
        assert f is not None, "WAL not open"
        before = f.tell()
        try:
            f.write(_RECORD.pack(len(payload), zlib.crc32(payload)) + payload)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        except BaseException:
            # Never leave a partial record in front of later ones.
            try:
                f.truncate(before)
                f.seek(before)
            except OSError:
                logger.exception("WAL %s: could not roll back a failed append", f.name)
            raise

    def append_upsert(self, batch: ObjectBatch) -> None:
        self.append(encode_upsert(batch))

    def append_delete(self, uuids: Sequence[str]) -> None:
        self.append(encode_delete(uuids))

    def rotate(self) -> int:
        """Start the next generation; returns it."""
        self.close()
        self._open_generation(self.generation + 1)
        return self.generation

    def size_bytes(self) -> int:
        return 0 if self._file is None else self._file.tell()

    def remove_before(self, generation: int) -> None:
        removed = False
        for gen in self.generations():
            if gen < generation:
                self.path(gen).unlink(missing_ok=True)
                removed = True
        if removed and self.fsync:
            fsync_dir(self.directory)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
