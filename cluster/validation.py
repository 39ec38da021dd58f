"""Turn user-supplied objects into an ``ObjectBatch`` validated against a ``CollectionSpec``.

The gateway does structural checks (JSON shape, rectangular finite float matrices); this module
checks everything that needs the spec: dims, multi vs single, unknown names, property types.
A batch with any invalid object is rejected whole, naming the object, so nothing is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.errors import InvalidInput
from cluster.ids import new_uuid, normalize_uuid
from cluster.spec import CollectionSpec, PropertySpec
from cluster.types import F32, I64, ObjectBatch, VectorColumn, as_matrix, l2_normalize


@dataclass(frozen=True)
class ObjectInput:
    """One object as received: optional id, raw properties, vectors as numpy arrays."""

    uuid: str | None
    properties: Mapping[str, Any] = field(default_factory=dict)
    vectors: Mapping[str, Any] = field(default_factory=dict)  # name -> 1-D or 2-D array


@dataclass(frozen=True)
class VectorInput:
    """One named vector of a columnar batch: every row of every object in one flat float32
    ``(n_rows, dim)`` array, object ``i`` owning rows ``offsets[i]:offsets[i+1]``.

    ``multi``: the column was a list of vectors per object (else one flat vector per object,
    one row). ``present``: which objects have the vector (``None``: all of them)."""

    values: F32
    offsets: I64
    multi: bool = True
    present: npt.NDArray[np.bool_] | None = None

    def row_value(self, i: int) -> F32 | None:
        """Object ``i``'s vector as the per-object decoder gives it (2-D multi, 1-D single)."""
        if self.present is not None and not bool(self.present[i]):
            return None
        rows = self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]
        return rows if self.multi else rows.reshape(-1)


@dataclass(frozen=True)
class ColumnarInput:
    """A batch of objects as columns (the Arrow import): ids, properties per object, and per
    named vector one ``VectorInput``. It crosses Ray as a handful of numpy buffers instead of
    thousands of small arrays; ``prepare_columnar`` validates it without per-object arrays."""

    uuids: tuple[str | None, ...]
    properties: tuple[Mapping[str, Any], ...]
    vectors: Mapping[str, VectorInput] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.uuids)

    def to_objects(self) -> list[ObjectInput]:
        """The same batch as per-object inputs (the general validation path)."""
        out = []
        for i, (uuid, props) in enumerate(zip(self.uuids, self.properties, strict=True)):
            vectors = {
                name: v for name, col in self.vectors.items() if (v := col.row_value(i)) is not None
            }
            out.append(ObjectInput(uuid, props, vectors))
        return out

    def missing(self, name: str) -> bool:
        """Some object lacks the named vector."""
        col = self.vectors.get(name)
        return col is None or (col.present is not None and not bool(col.present.all()))


def parse_date(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("not a string")
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("RFC3339 dates need a timezone (e.g. 'Z')")
    return parsed


def check_property_value(prop: PropertySpec, value: Any) -> Any:
    """Return the canonical stored value or raise InvalidInput. ``None`` means null."""
    if value is None:
        return None
    t = prop.data_type
    ok = True
    if t == "text":
        ok = isinstance(value, str)
    elif t == "text[]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif t == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    elif t == "number":
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        )
        if ok:
            value = float(value)
    elif t == "boolean":
        ok = isinstance(value, bool)
    elif t == "date":
        try:
            parse_date(value)
        except ValueError:
            ok = False
    elif t == "uuid":
        try:
            value = normalize_uuid(value) if isinstance(value, str) else None
            ok = value is not None
        except InvalidInput:
            ok = False
    if not ok:
        raise InvalidInput(
            f"property {prop.name!r}: expected {t}, got {value!r}",
            {"property": prop.name, "data_type": t},
        )
    return value


def check_properties(spec: CollectionSpec, properties: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(properties, Mapping):
        raise InvalidInput("properties must be an object")
    by_name = {p.name: p for p in spec.properties}
    out: dict[str, Any] = {}
    for name, value in properties.items():
        prop = by_name.get(name)
        if prop is None:
            raise InvalidInput(
                f"collection {spec.name!r} has no property {name!r}",
                {"property": name, "collection": spec.name},
            )
        out[name] = check_property_value(prop, value)
    return out


def prepare_query_vector(spec: CollectionSpec, target_vector: str | None, value: Any) -> F32:
    """Validate a query vector for ``target_vector`` and normalise it for cosine."""
    vec = spec.vector(target_vector)
    matrix = as_matrix(value, vec.dim, what=f"near_vector[{vec.name}]", multi=vec.multi)
    return l2_normalize(matrix) if vec.metric == "cosine" else matrix


def prepare_batch(
    spec: CollectionSpec,
    objects: Sequence[ObjectInput],
    *,
    vectorized: Mapping[str, Sequence[F32 | None]] | None = None,
) -> ObjectBatch:
    """Validate every object; raise InvalidInput naming the first bad one (nothing written).

    ``vectorized`` supplies vectors produced by a vectorizer, by named vector and position.
    """
    if len(objects) == 0:
        raise InvalidInput("the batch holds no objects")
    uuids: list[str] = []
    props: list[dict[str, Any]] = []
    columns: dict[str, list[F32 | None]] = {v.name: [] for v in spec.vectors}
    seen: dict[str, int] = {}
    vector_names = {v.name for v in spec.vectors}
    for i, obj in enumerate(objects):
        try:
            oid = normalize_uuid(obj.uuid) if obj.uuid is not None else new_uuid()
            if oid in seen:
                raise InvalidInput(f"duplicate id {oid} in batch (also at {seen[oid]})")
            seen[oid] = i
            props.append(check_properties(spec, obj.properties))
            unknown = sorted(set(obj.vectors) - vector_names)
            if unknown:
                raise InvalidInput(
                    f"collection {spec.name!r} has no named vector(s) {unknown}",
                    {"vectors": unknown},
                )
            for vec in spec.vectors:
                raw = obj.vectors.get(vec.name)
                matrix: F32 | None
                if raw is not None:
                    matrix = as_matrix(raw, vec.dim, what=vec.name, multi=vec.multi)
                elif vectorized is not None and vec.name in vectorized:
                    matrix = vectorized[vec.name][i]
                else:
                    matrix = None
                if matrix is None and vec.vectorizer.kind == "none":
                    raise InvalidInput(
                        f"missing vector {vec.name!r} (no vectorizer configured)",
                        {"vector": vec.name},
                    )
                if matrix is not None and vec.metric == "cosine":
                    matrix = l2_normalize(matrix)
                if matrix is not None and vec.dtype == "float16" and _beyond_float16(matrix):
                    raise InvalidInput(
                        f"vector {vec.name!r} stores float16: values must lie within ±65504",
                        {"vector": vec.name},
                    )
                columns[vec.name].append(matrix)
            uuids.append(oid)
        except InvalidInput as exc:
            details = {**exc.details, "index": i}
            if obj.uuid is not None:
                details["id"] = str(obj.uuid)
            raise InvalidInput(f"object {i}: {exc.message}", details) from exc
    return ObjectBatch(
        tuple(uuids),
        tuple(props),
        {v.name: VectorColumn.from_matrices(columns[v.name], v.dim) for v in spec.vectors},
    )


# The smallest magnitude float16 rounds to infinity (its largest finite value is 65504).
FLOAT16_OVERFLOW = 65520.0


def _beyond_float16(values: F32) -> bool:
    """Whether some value would be stored as ±Inf by a float16 vector."""
    return values.size > 0 and float(np.abs(values).max()) >= FLOAT16_OVERFLOW


class _Fallback(Exception):
    """The columnar fast path cannot decide: validate object by object instead."""


def prepare_columnar(spec: CollectionSpec, batch: ColumnarInput) -> ObjectBatch:
    """``prepare_batch`` for a columnar batch: the same result (and, for any invalid batch, the
    very same error: it is re-validated object by object, which names the first bad object)
    with the vector checks (dims, NaN/Inf, empty rows) and cosine normalisation done once over
    each flat array. Vectors still to be computed by a vectorizer are the caller's business
    (it passes ``batch.to_objects()`` to ``prepare_batch`` then)."""
    try:
        return _prepare_columnar(spec, batch)
    except (_Fallback, InvalidInput):
        return prepare_batch(spec, batch.to_objects())


def _prepare_columnar(spec: CollectionSpec, batch: ColumnarInput) -> ObjectBatch:
    n = len(batch)
    if n == 0 or len(batch.properties) != n:
        raise _Fallback
    names = {v.name for v in spec.vectors}
    if set(batch.vectors) - names:
        raise _Fallback
    uuids: list[str] = []
    seen: set[str] = set()
    props: list[dict[str, Any]] = []
    for raw_id, raw_props in zip(batch.uuids, batch.properties, strict=True):
        oid = normalize_uuid(raw_id) if raw_id is not None else new_uuid()
        if oid in seen:
            raise _Fallback
        seen.add(oid)
        uuids.append(oid)
        props.append(check_properties(spec, raw_props))
    columns: dict[str, VectorColumn] = {}
    for vec in spec.vectors:
        col = batch.vectors.get(vec.name)
        if col is None or batch.missing(vec.name) or col.multi != vec.multi:
            raise _Fallback
        values = col.values
        offsets = np.asarray(col.offsets, dtype=np.int64)
        if (
            values.ndim != 2
            or values.shape[1] != vec.dim
            or vec.dim == 0
            or len(offsets) != n + 1
            or int(offsets[0]) != 0
            or int(offsets[-1]) != values.shape[0]
        ):
            raise _Fallback
        lengths = np.diff(offsets)
        if (lengths <= 0).any() or (not vec.multi and (lengths != 1).any()):
            raise _Fallback  # empty (or, for single vectors, several) rows
        values = np.asarray(values, dtype=np.float32)
        if vec.metric == "cosine":
            # l2_normalize's arithmetic, once over the flat array (same bytes). A finite norm
            # means a finite row; a non-finite one is NaN/Inf or a float32 overflow.
            norms = np.linalg.norm(values, axis=1, keepdims=True)
            if not np.isfinite(norms).all() and not np.isfinite(values).all():
                raise _Fallback
            norms[norms == 0] = 1.0
            values = values / norms
        elif not np.isfinite(values).all():
            raise _Fallback
        if vec.dtype == "float16" and _beyond_float16(values):
            raise _Fallback
        columns[vec.name] = VectorColumn(np.ascontiguousarray(values, dtype=np.float32), offsets)
    return ObjectBatch(tuple(uuids), tuple(props), columns)
