"""Segments: the growing one (in memory, append-only) and sealed ones (immutable Arrow IPC files,
memory-mapped), and the immutable views the search (shard.search) works on.

Sealed segment directory ``seg-<id>/``::

    objects.arrow       row int64, uuid string, properties large_string (JSON),
                        "ntok:<vector>" int32 per named vector (rows of that object)
    vec-<vector>.arrow  row int32 (owning object, = token→doc map), vector FixedSizeList<float32|
                        float16, dim>; object i's tokens are contiguous, in object order. With a
                        lossy codec (shard.tokencodec) ``vector`` holds the codes (int8 × dim,
                        or the residual's packed bytes, plus a ``centroid`` int32 column)
    codec-<vector>.npz  the lossy codec's scales or centroids and buckets
    orig-<vector>.bin   a lossy-coded vector's rows as written (``codec.originals``): raw
                        (n_rows, dim) in the vector's dtype, read with pread (``ColdRows``)
    index-<vector>/     ScaNN searcher, or for an ``index.kind == "muvera"`` vector the
                        documents' FDEs (shard.muvera); built in the background, absent below
                        the brute-force threshold or until built
    deleted-<n>.bits    tombstones (np.packbits), named by the manifest that references them

A segment's data never changes once written; only its tombstone mask does, copy-on-write: a write
batch replaces the mask array, so a search holding the old array sees a consistent snapshot
without copying.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.ipc as ipc

from cluster.errors import Unavailable
from cluster.spec import CollectionSpec
from cluster.types import ObjectBatch
from shard.codec import decode_properties, encode_properties, fsync_tree
from shard.index import ScannTokenIndex
from shard.maxsim import Tokens, gather_many, widen
from shard.muvera import MuveraIndex
from shard.tokencodec import (
    CodedTokens,
    Int8Tokens,
    codec_path,
    encode,
    is_coded,
    read_coded,
    write_codebook,
)
from shard.tokencodec import gather as gather_coded

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


def _np_dtype(spec_dtype: str) -> type[np.floating[Any]]:
    return np.float16 if spec_dtype == "float16" else np.float32


# --------------------------------------------------------------------------- views


# A sealed segment's rows of one vector: a float array, or codes (shard.tokencodec) that slice
# and ``take`` to decoded float32 rows.
StoredTokens = Tokens | CodedTokens


@dataclass(frozen=True)
class VectorView:
    tokens: StoredTokens  # (n_rows, dim) in storage dtype, or coded
    offsets: I64  # (n_objects + 1,)
    tok2doc: npt.NDArray[np.integer[Any]] | None  # (n_rows,), only where an index exists
    index: ScannTokenIndex | None
    fde: MuveraIndex | None = None  # muvera vectors: per-document FDEs instead of ``index``
    originals: ColdRows | None = None  # lossy-coded ``tokens``: the rows as written, if kept


@dataclass(frozen=True)
class SegmentView:
    """An immutable snapshot of one segment, taken under the engine lock, searched outside it."""

    segment: Segment
    n_objects: int
    deleted: Bools  # (n_objects,)
    vectors: Mapping[str, VectorView]


# --------------------------------------------------------------------------- segments


class Segment:
    """Common read API of growing and sealed segments (row = position in the segment)."""

    uuids: Sequence[str]
    deleted: Bools

    @property
    def n_objects(self) -> int:
        raise NotImplementedError

    def properties(self, row: int) -> dict[str, Any]:
        raise NotImplementedError

    def all_properties(self) -> Sequence[Mapping[str, Any]]:
        raise NotImplementedError

    def vectors_of(self, row: int) -> dict[str, F32]:
        raise NotImplementedError

    def lossy_vectors(self) -> tuple[str, ...]:
        """Vectors whose ``vectors_of`` rows are decoded codes, not the values written."""
        return ()

    def view(self) -> SegmentView:
        raise NotImplementedError

    def mark_deleted(self, rows: Sequence[int]) -> None:
        """Copy-on-write tombstoning (callers hold the engine lock)."""
        mask = self.deleted.copy()
        mask[np.asarray(rows, dtype=np.int64)] = True
        self.deleted = mask

    def n_live(self) -> int:
        return self.n_objects - int(np.count_nonzero(self.deleted[: self.n_objects]))

    def live_tokens(self, vector: str) -> int:
        raise NotImplementedError


def owned_float32(tokens: Tokens) -> F32:
    """A float32 copy of stored rows that the caller owns (the rows are memory-mapped or live in
    a growing buffer): float16 widened like the re-score (``maxsim.widen``, a new array)."""
    return widen(tokens) if tokens.dtype == np.float16 else tokens.astype(np.float32)


def all_float32(tokens: StoredTokens) -> F32:
    """Every row as float32 (index builds): coded rows decoded, float16 widened; a float32
    array is returned as it is."""
    if is_coded(tokens):
        return tokens[:]
    return widen(cast(Tokens, tokens))


# The most a growing segment reserves per named vector (virtual memory: pages are only backed
# once rows are written).
GROWING_RESERVE_BYTES = 128 * 1024 * 1024


class _TokenBuffer:
    """Append-only rows + offsets with amortised doubling. Views handed out stay valid: growth
    allocates a new array and rows below ``n_rows`` are never rewritten."""

    def __init__(self, dim: int, dtype: type[np.floating[Any]], capacity_rows: int = 256) -> None:
        # np.zeros of a large array maps untouched zero pages: capacity costs no memory until
        # rows are written, and appends up to it never copy the rows already there.
        self.values: Tokens = np.zeros((max(1, capacity_rows), dim), dtype=dtype)
        self.n_rows = 0
        self.offsets: I64 = np.zeros(65, dtype=np.int64)
        self.n_objects = 0

    def append(self, values: F32, lengths: I64) -> None:
        n_new, r_new = len(lengths), int(values.shape[0])
        if self.n_rows + r_new > len(self.values):
            cap = max(2 * len(self.values), self.n_rows + r_new)
            grown = np.zeros((cap, self.values.shape[1]), dtype=self.values.dtype)
            grown[: self.n_rows] = self.values[: self.n_rows]
            self.values = grown
        if self.n_objects + n_new + 1 > len(self.offsets):
            cap = max(2 * len(self.offsets), self.n_objects + n_new + 1)
            grown_o = np.zeros(cap, dtype=np.int64)
            grown_o[: self.n_objects + 1] = self.offsets[: self.n_objects + 1]
            self.offsets = grown_o
        self.values[self.n_rows : self.n_rows + r_new] = values
        ends = self.n_rows + np.cumsum(lengths)
        self.offsets[self.n_objects + 1 : self.n_objects + 1 + n_new] = ends
        self.n_rows += r_new
        self.n_objects += n_new

    def rows(self, i: int) -> Tokens:
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]


class GrowingSegment(Segment):
    """Recent writes, in memory (and in the WAL). Searched exactly. Frozen while being sealed."""

    def __init__(self, spec: CollectionSpec, capacity_tokens: int = 0) -> None:
        """``capacity_tokens``: rows reserved per named vector up front (the seal threshold),
        at most ``GROWING_RESERVE_BYTES`` each; beyond them a buffer doubles."""
        self.spec = spec
        self.uuids: list[str] = []
        self._props: list[dict[str, Any]] = []
        self.deleted = np.zeros(0, dtype=np.bool_)
        self._buffers: dict[str, _TokenBuffer] = {}
        for v in spec.vectors:
            dtype = _np_dtype(v.dtype)
            cap = min(
                capacity_tokens, GROWING_RESERVE_BYTES // max(1, v.dim * np.dtype(dtype).itemsize)
            )
            self._buffers[v.name] = _TokenBuffer(v.dim, dtype, max(256, cap))
        self.frozen = False

    @property
    def n_objects(self) -> int:
        return len(self.uuids)

    def n_tokens(self) -> int:
        return sum(b.n_rows for b in self._buffers.values())

    def append(self, batch: ObjectBatch) -> int:
        """Append a batch; returns the row of its first object."""
        assert not self.frozen, "append to a frozen segment"
        base = len(self.uuids)
        n = len(batch)
        for name, buf in self._buffers.items():
            col = batch.vectors.get(name)
            if col is None:
                buf.append(
                    np.zeros((0, buf.values.shape[1]), dtype=np.float32),
                    np.zeros(n, dtype=np.int64),
                )
            else:
                buf.append(col.values, col.lengths())
        self._props.extend(dict(p) for p in batch.properties)
        self.deleted = np.concatenate([self.deleted, np.zeros(n, dtype=np.bool_)])
        self.uuids.extend(batch.uuids)  # last: readers bound by n_objects see complete rows
        return base

    def properties(self, row: int) -> dict[str, Any]:
        return self._props[row]

    def all_properties(self) -> Sequence[Mapping[str, Any]]:
        return self._props

    def vectors_of(self, row: int) -> dict[str, F32]:
        return {name: owned_float32(buf.rows(row)) for name, buf in self._buffers.items()}

    def live_tokens(self, vector: str) -> int:
        buf = self._buffers[vector]
        lengths = np.diff(buf.offsets[: buf.n_objects + 1])
        return int(lengths[~self.deleted[: buf.n_objects]].sum())

    def view(self) -> SegmentView:
        n = len(self.uuids)
        vectors = {
            name: VectorView(buf.values[: buf.n_rows], buf.offsets[: n + 1], None, None)
            for name, buf in self._buffers.items()
        }
        return SegmentView(self, n, self.deleted[:n], vectors)

    def write(
        self,
        directory: Path,
        *,
        fsync: bool,
        references: Mapping[str, CodedTokens] | None = None,
    ) -> None:
        """Persist as a sealed segment (callers rename ``directory`` into place afterwards);
        ``references``: per lossy-coded vector, a sealed segment's codes whose buckets the new
        codes reuse (``tokencodec.encode``)."""
        columns = {
            name: (buf.values[: buf.n_rows], np.diff(buf.offsets[: buf.n_objects + 1]))
            for name, buf in self._buffers.items()
        }
        write_segment(
            directory,
            self.spec,
            list(self.uuids),
            [encode_properties(p) for p in self._props],
            columns,
            fsync=fsync,
            references=references,
        )


def write_segment(
    directory: Path,
    spec: CollectionSpec,
    uuids: list[str],
    props_json: list[str],
    vectors: Mapping[str, tuple[StoredTokens, I64]],
    *,
    fsync: bool,
    references: Mapping[str, CodedTokens] | None = None,
    originals: Mapping[str, Tokens] | None = None,
) -> None:
    """Write the Arrow IPC files of a sealed segment into ``directory`` (created). A vector
    with a lossy codec arrives as float rows (encoded here, against ``references``, and kept as
    its originals where the codec keeps them) or as codes already, its originals in
    ``originals`` (a merge's ``gather_live``)."""
    directory.mkdir(parents=True)
    n = len(uuids)
    cols: dict[str, pa.Array] = {
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "uuid": pa.array(uuids, type=pa.string()),
        "properties": pa.array(props_json, type=pa.large_string()),
    }
    for v in spec.vectors:
        tokens, lengths = vectors[v.name]
        cols[f"ntok:{v.name}"] = pa.array(np.asarray(lengths, dtype=np.int32))
        token_cols: dict[str, pa.Array] = {
            "row": pa.array(np.repeat(np.arange(n, dtype=np.int32), lengths))
        }
        if v.codec.lossy:
            coded = (
                tokens
                if is_coded(tokens)
                else encode(
                    cast(Tokens, tokens),
                    v.codec.kind,
                    v.codec.bits,
                    reference=(references or {}).get(v.name),
                )
            )
            write_codebook(directory, v.name, coded)
            kept = tokens if not is_coded(tokens) else (originals or {}).get(v.name)
            if v.codec.originals and kept is not None:
                with open(directory / f"orig-{v.name}.bin", "wb") as f:
                    f.write(np.ascontiguousarray(kept, dtype=_np_dtype(v.dtype)).data)
            rows: npt.NDArray[Any]
            if isinstance(coded, Int8Tokens):
                rows, width = coded.codes, v.dim
            else:
                rows, width = coded.packed, int(coded.packed.shape[1])
                token_cols["centroid"] = pa.array(coded.cids)
            flat_codes = np.ascontiguousarray(rows).reshape(-1)
            token_cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(flat_codes), width)
        else:
            flat = np.ascontiguousarray(tokens, dtype=_np_dtype(v.dtype)).reshape(-1)
            token_cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), v.dim)
        _write_ipc(directory / f"vec-{v.name}.arrow", pa.table(token_cols))
    _write_ipc(directory / "objects.arrow", pa.table(cols))
    if fsync:
        fsync_tree(directory)


def _write_ipc(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, table.num_rows))


def _read_ipc(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as source:
        return ipc.open_file(source).read_all()


class ColdRows:
    """A lossy-coded vector's originals: a raw file of (n_rows, dim) rows in the vector's dtype
    that is read, not memory-mapped. A query's final re-rank reads its few documents with
    ``pread`` (through the page cache, mapping nothing: a memory-mapped file's page faults map
    up to 64 KiB of cached neighbours each, and 20 queries made a 55 MB originals file fully
    resident); exact searches, index builds and merges map it for their duration only
    (``whole``)."""

    def __init__(self, path: Path, dim: int, dtype: type[np.floating[Any]]) -> None:
        self.path = path
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self._row_bytes = dim * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)
        self.n_rows = os.fstat(self._fd).st_size // self._row_bytes
        # closed when the segment is dropped (a merged-away segment's file stays readable by
        # searches still holding it, like its memory maps)
        weakref.finalize(self, os.close, self._fd)

    def rows(self, lo: int, hi: int) -> F32:
        """Rows ``lo:hi`` as an owned float32 array."""
        raw = np.empty((max(0, hi - lo), self.dim), dtype=self.dtype)
        self._read(_bytes_of(raw), lo)
        return widen(raw)

    def gather(self, offsets: I64, docs: I64) -> tuple[F32, I64]:
        """The rows of documents ``docs`` (one read per document) and their new offsets."""
        new_offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(offsets[docs + 1] - offsets[docs], out=new_offsets[1:])
        raw = np.empty((int(new_offsets[-1]), self.dim), dtype=self.dtype)
        buffer, row_bytes = _bytes_of(raw), self._row_bytes
        at = new_offsets.tolist()
        for i, start in enumerate(offsets[docs].tolist()):
            self._read(buffer[at[i] * row_bytes : at[i + 1] * row_bytes], start)
        return widen(raw), new_offsets

    def _read(self, buffer: memoryview, row: int) -> None:
        """Fill ``buffer`` with the file's bytes from row ``row`` on."""
        want = len(buffer)
        if want == 0:
            return
        got = os.preadv(self._fd, [buffer], row * self._row_bytes)
        if got != want:
            raise Unavailable(
                f"{self.path}: short read ({got} of {want} bytes): the file is damaged",
                {"path": str(self.path)},
            )

    def whole(self) -> Tokens:
        """Every row, memory-mapped (read-only) for as long as the caller holds the array."""
        if self.n_rows == 0:
            return np.zeros((0, self.dim), dtype=self.dtype)
        rows: Tokens = np.memmap(
            self.path, dtype=self.dtype, mode="r", shape=(self.n_rows, self.dim)
        )
        return rows


def _bytes_of(rows: npt.NDArray[Any]) -> memoryview:
    """A contiguous array's bytes, writable in place."""
    return memoryview(rows.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _column_numpy(table: pa.Table, name: str) -> npt.NDArray[Any]:
    chunked = table.column(name)
    arr = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    return np.asarray(arr.to_numpy(zero_copy_only=False))


class SealedSegment(Segment):
    """An immutable on-disk segment, memory-mapped; tombstones and indexes swap in atomically."""

    def __init__(self, segment_id: int, directory: Path, spec: CollectionSpec) -> None:
        self.segment_id = segment_id
        self.directory = directory
        self.spec = spec
        objects = _read_ipc(directory / "objects.arrow")
        self.uuids = objects.column("uuid").to_pylist()
        self._props_json = objects.column("properties")
        self._props_cache: list[dict[str, Any]] | None = None
        self.deleted = np.zeros(len(self.uuids), dtype=np.bool_)
        self._tokens: dict[str, StoredTokens] = {}
        self._originals: dict[str, ColdRows] = {}  # lossy-coded vectors' rows as written
        self._offsets: dict[str, I64] = {}
        self._tok2doc: dict[str, npt.NDArray[np.int32]] = {}
        self.indexes: dict[str, ScannTokenIndex | MuveraIndex] = {}
        n = len(self.uuids)
        for v in spec.vectors:
            offsets = np.zeros(n + 1, dtype=np.int64)
            path = directory / f"vec-{v.name}.arrow"
            if path.exists():  # absent: vector added after this segment was written
                np.cumsum(_column_numpy(objects, f"ntok:{v.name}"), out=offsets[1:])
                table = _read_ipc(path)
                vec_chunks = table.column("vector")
                arr = (
                    vec_chunks.chunk(0)
                    if vec_chunks.num_chunks == 1
                    else vec_chunks.combine_chunks()
                )
                flat = arr.flatten().to_numpy(zero_copy_only=False)  # zero-copy when possible
                rows = flat.reshape(-1, arr.type.list_size)
                if codec_path(directory, v.name).exists():
                    cids = (
                        _column_numpy(table, "centroid")
                        if "centroid" in table.column_names
                        else None
                    )
                    self._tokens[v.name] = read_coded(directory, v.name, rows, cids)
                    orig = directory / f"orig-{v.name}.bin"
                    if orig.exists():
                        self._originals[v.name] = ColdRows(orig, v.dim, _np_dtype(v.dtype))
                else:
                    self._tokens[v.name] = rows
                self._tok2doc[v.name] = _column_numpy(table, "row").astype(np.int32, copy=False)
            else:
                self._tokens[v.name] = np.zeros((0, v.dim), dtype=_np_dtype(v.dtype))
                self._tok2doc[v.name] = np.zeros(0, dtype=np.int32)
            self._offsets[v.name] = offsets

    @property
    def n_objects(self) -> int:
        return len(self.uuids)

    def n_tokens(self, vector: str) -> int:
        return int(self._tokens[vector].shape[0])

    def total_tokens(self) -> int:
        return sum(int(t.shape[0]) for t in self._tokens.values())

    def tokens(self, vector: str) -> StoredTokens:
        return self._tokens[vector]

    def originals(self, vector: str) -> ColdRows | None:
        """A lossy-coded vector's rows as written, where the segment keeps them."""
        return self._originals.get(vector)

    def coded(self, vector: str) -> CodedTokens | None:
        """The vector's codes where its codec is lossy."""
        tokens = self._tokens.get(vector)
        return tokens if is_coded(tokens) else None

    def offsets(self, vector: str) -> I64:
        return self._offsets[vector]

    def lengths(self, vector: str) -> I64:
        return np.diff(self._offsets[vector])

    def props_json(self, rows: I64) -> list[str]:
        return [str(s) for s in self._props_json.take(pa.array(rows)).to_pylist()]

    def properties(self, row: int) -> dict[str, Any]:
        if self._props_cache is not None:
            return self._props_cache[row]
        return decode_properties(str(self._props_json[row].as_py()))

    def all_properties(self) -> Sequence[Mapping[str, Any]]:
        if self._props_cache is None:  # decoded once, for filters over the whole segment
            self._props_cache = [decode_properties(s) for s in self._props_json.to_pylist()]
        return self._props_cache

    def vectors_of(self, row: int) -> dict[str, F32]:
        out = {}
        for name, tokens in self._tokens.items():
            rows = slice(int(self._offsets[name][row]), int(self._offsets[name][row + 1]))
            kept = self._originals.get(name)
            if kept is not None:
                out[name] = kept.rows(rows.start, rows.stop)
            elif is_coded(tokens):
                out[name] = tokens[rows]
            else:
                out[name] = owned_float32(cast(Tokens, tokens)[rows])
        return out

    def lossy_vectors(self) -> tuple[str, ...]:
        """Vectors whose ``vectors_of`` rows are decoded codes, not the values written."""
        return tuple(
            name for name, t in self._tokens.items() if is_coded(t) and name not in self._originals
        )

    def live_tokens(self, vector: str) -> int:
        return int(self.lengths(vector)[~self.deleted].sum())

    def view(self) -> SegmentView:
        vectors = {}
        for name in self._tokens:
            index = self.indexes.get(name)
            vectors[name] = VectorView(
                self._tokens[name],
                self._offsets[name],
                self._tok2doc[name],
                index if isinstance(index, ScannTokenIndex) else None,
                index if isinstance(index, MuveraIndex) else None,
                self._originals.get(name),
            )
        return SegmentView(self, self.n_objects, self.deleted, vectors)

    def index_dir(self, vector: str) -> Path:
        return self.directory / f"index-{vector}"


@dataclass
class Gathered:
    """Compaction input: rows of several sealed segments, concatenated."""

    uuids: list[str]
    props_json: list[str]
    vectors: dict[str, tuple[StoredTokens, I64]]
    originals: dict[str, Tokens]  # lossy-coded vectors' kept rows as written


def gather_live(sources: Sequence[tuple[SealedSegment, I64]], spec: CollectionSpec) -> Gathered:
    """Rows of several sealed segments, concatenated (compaction input); a lossy-coded
    vector's codes are copied, not decoded (``tokencodec.gather``), and its originals with
    them where every source keeps them."""
    uuids: list[str] = []
    props: list[str] = []
    for seg, rows in sources:
        uuids.extend(seg.uuids[int(r)] for r in rows)
        props.extend(seg.props_json(rows))
    vectors: dict[str, tuple[StoredTokens, I64]] = {}
    originals: dict[str, Tokens] = {}
    for v in spec.vectors:
        # a source without this vector's rows (added later) has no codes to copy
        parts = [
            (c, seg.offsets(v.name), rows)
            for seg, rows in sources
            if (c := seg.coded(v.name)) is not None
        ]
        if v.codec.lossy and parts:
            kept = [seg.originals(v.name) for seg, _ in sources]
            if v.codec.originals and all(
                k is not None or seg.n_tokens(v.name) == 0
                for k, (seg, _) in zip(kept, sources, strict=True)
            ):
                originals[v.name] = gather_many(
                    [
                        (k.whole(), seg.offsets(v.name), r)
                        for k, (seg, r) in zip(kept, sources, strict=True)
                        if k is not None
                    ],
                    v.dim,
                    _np_dtype(v.dtype),
                )[0]
            lengths = np.concatenate(
                [seg.offsets(v.name)[r + 1] - seg.offsets(v.name)[r] for seg, r in sources]
            ).astype(np.int64)
            vectors[v.name] = (gather_coded(parts, originals.get(v.name)), lengths)
            continue
        # one buffer for all sources (a 4M-token merge used to allocate its tokens twice)
        vectors[v.name] = gather_many(
            [
                (cast(Tokens, seg.tokens(v.name)), seg.offsets(v.name), rows)
                for seg, rows in sources
            ],
            v.dim,
            _np_dtype(v.dtype),
        )
    return Gathered(uuids, props, vectors, originals)
