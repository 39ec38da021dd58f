"""Typed internal requests and results. Frozen dataclasses and numpy arrays, no wire models.

A batch of multi-vectors travels as one flat ``(n_rows, dim)`` float32 array plus ``offsets``
(``n_objects + 1`` int64): object ``i`` owns rows ``offsets[i]:offsets[i+1]``. An object with zero
rows has no vector under that name. Single vectors are one-row matrices, so every scoring path is
MaxSim (which for one query row against one document row is the plain dot product).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.errors import InvalidInput

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def as_matrix(value: Any, dim: int, *, what: str, multi: bool = True) -> F32:
    """Validate one vector value into a C-contiguous float32 ``(n, dim)`` matrix.

    ``multi=False`` expects a flat list of ``dim`` floats and returns a ``(1, dim)`` matrix.
    Raises InvalidInput for ragged/empty matrices, wrong dims, NaN/Inf, or the wrong nesting.
    """
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"{what}: not a rectangular numeric matrix (ragged rows?)", {"vector": what}
        ) from exc
    if multi:
        if arr.ndim != 2:
            raise InvalidInput(
                f"{what}: a multi-vector must be a list of vectors (2-D), got {arr.ndim}-D",
                {"vector": what, "ndim": int(arr.ndim)},
            )
    else:
        if arr.ndim != 1:
            raise InvalidInput(
                f"{what}: a single vector must be a flat list of floats, got {arr.ndim}-D",
                {"vector": what, "ndim": int(arr.ndim)},
            )
        arr = arr.reshape(1, -1)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInput(f"{what}: empty vector", {"vector": what})
    if arr.shape[1] != dim:
        raise InvalidInput(
            f"{what}: expected dim {dim}, got {arr.shape[1]}",
            {"vector": what, "expected_dim": dim, "dim": int(arr.shape[1])},
        )
    if not np.isfinite(arr).all():
        raise InvalidInput(f"{what}: NaN or Inf in vector", {"vector": what})
    return np.ascontiguousarray(arr)


def l2_normalize(values: F32) -> F32:
    """Row-wise L2 normalisation (cosine metric); zero rows stay zero."""
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(values / norms, dtype=np.float32)


@dataclass(frozen=True)
class VectorColumn:
    """One named vector for a batch of objects: flat rows plus per-object offsets."""

    values: F32  # (n_rows, dim)
    offsets: I64  # (n_objects + 1,)

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.offsets.ndim != 1 or len(self.offsets) < 1:
            raise ValueError("VectorColumn needs 2-D values and 1-D offsets")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.values.shape[0]:
            raise ValueError("VectorColumn offsets must start at 0 and end at n_rows")
        if len(self.offsets) > 1 and np.any(np.diff(self.offsets) < 0):
            raise ValueError("VectorColumn offsets must be non-decreasing")

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @property
    def n_objects(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    def rows(self, i: int) -> F32:
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def lengths(self) -> I64:
        return np.diff(self.offsets).astype(np.int64)

    @classmethod
    def from_matrices(cls, matrices: Sequence[F32 | None], dim: int) -> VectorColumn:
        """``None`` entries become objects without a vector (zero rows)."""
        lengths = [0 if m is None else int(m.shape[0]) for m in matrices]
        offsets = np.zeros(len(matrices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        parts = [m for m in matrices if m is not None and m.shape[0] > 0]
        values = (
            np.concatenate(parts).astype(np.float32, copy=False)
            if parts
            else np.zeros((0, dim), dtype=np.float32)
        )
        return cls(np.ascontiguousarray(values), offsets)

    def take(self, indices: Sequence[int] | I64) -> VectorColumn:
        """The objects at ``indices``, in that order: one gather of their rows."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        lengths = np.diff(self.offsets)[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(idx) == self.n_objects and np.array_equal(idx, np.arange(len(idx))):
            return self  # immutable: the whole column in order is itself
        rows = np.repeat(self.offsets[idx] - offsets[:-1], lengths) + np.arange(
            offsets[-1], dtype=np.int64
        )
        # np.take: ~1.5x faster than fancy indexing for the row gather
        values = np.take(np.asarray(self.values, dtype=np.float32), rows, axis=0)
        return VectorColumn(np.ascontiguousarray(values), offsets)


@dataclass(frozen=True)
class ObjectBatch:
    """Objects to upsert: ids, properties and named vectors, aligned by position."""

    uuids: tuple[str, ...]
    properties: tuple[Mapping[str, Any], ...]
    vectors: Mapping[str, VectorColumn] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.properties) != len(self.uuids):
            raise ValueError("ObjectBatch: properties and uuids differ in length")
        for name, col in self.vectors.items():
            if col.n_objects != len(self.uuids):
                raise ValueError(f"ObjectBatch: vector {name!r} has {col.n_objects} objects")

    def __len__(self) -> int:
        return len(self.uuids)

    def take(self, indices: Sequence[int]) -> ObjectBatch:
        return ObjectBatch(
            tuple(self.uuids[i] for i in indices),
            tuple(self.properties[i] for i in indices),
            {name: col.take(indices) for name, col in self.vectors.items()},
        )


@dataclass(frozen=True)
class WriteResult:
    uuid: str
    ok: bool
    error: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class StoredObject:
    uuid: str
    properties: Mapping[str, Any]
    vectors: Mapping[str, F32] | None = None  # name -> (n, dim); None when not requested
    # names of ``vectors`` decoded from a lossy codec without kept originals (not as written)
    lossy: tuple[str, ...] = ()


@dataclass(frozen=True)
class VectorSearch:
    """A shard-level MaxSim search. ``query`` is already normalised for cosine vectors."""

    target_vector: str
    query: F32  # (n_query_tokens, dim)
    k: int  # offset + limit: shards return that many, the coordinator cuts once
    filter: Any = None  # cluster.filters.Filter once filters exist
    return_properties: tuple[str, ...] | None = None  # None = all properties
    include_vectors: bool = False
    explain: bool = False
    exact: bool = False  # exact MaxSim over every eligible object (no token index, no FDE)
    # A measurement (the recall report), not a user's query: not kept as a sample of real
    # queries for the shard's calibration.
    probe: bool = False
    # Seconds the shard may work on it from when it starts (the caller's remaining deadline,
    # set by the shard client): past it the shard stops and raises DeadlineExceeded.
    budget_s: float | None = None


@dataclass(frozen=True)
class KeywordSearch:
    """A shard-level BM25 search."""

    query: str
    k: int
    properties: tuple[str, ...] | None = None  # None = all searchable text properties
    filter: Any = None
    return_properties: tuple[str, ...] | None = None
    include_vectors: bool = False


@dataclass(frozen=True)
class Hit:
    uuid: str
    score: float
    properties: Mapping[str, Any] = field(default_factory=dict)
    vectors: Mapping[str, F32] | None = None
    explain: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ShardSearchResult:
    shard: int
    hits: tuple[Hit, ...]  # best first, at most k
    n_candidates: int = 0  # documents re-scored exactly
    n_objects: int = 0  # live objects searched


@dataclass(frozen=True)
class ShardStats:
    shard: int
    n_objects: int
    n_tokens: Mapping[str, int]
    n_segments: int
    index_state: Mapping[str, str] = field(default_factory=dict)
    bytes_on_disk: int = 0
    data_lost: str | None = None  # restarted without its data (shard.actor); serves nothing
    pid: int = 0  # the shard actor's process (0 outside an actor): current after a restart
    # Per vector: recall calibration state, figures and search parameters in use
    # (ShardEngine.calibration_report).
    calibration: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
