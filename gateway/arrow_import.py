"""Arrow IPC stream import: decode ``application/vnd.apache.arrow.stream`` bodies into objects.

Columns: ``id`` (string, optional), one column per property (by name), and one column per named
vector: ``list<list<float>>`` (multi-vector, or ``list<fixed_size_list<float>>``) or
``list<float>`` / ``fixed_size_list<float>`` (single vector). A column is a vector when its leaf
type is floating point (no property type is a float list); a ``vectors.`` prefix is stripped.
Vectors are sliced out of the column's flat buffer — no per-float Python objects.

``batch_from_arrow`` (what the route uses) keeps the vectors columnar when every vector column
is rectangular (one dim per column, no null tokens): a ``ColumnarInput`` holding each column's
flat float32 values + offsets, validated in one pass by the coordinator. Anything else (ragged
or null token vectors, mixed dims) goes through the per-object decoder, whose errors it keeps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from cluster.errors import BadRequest, InvalidInput
from cluster.validation import ColumnarInput, ObjectInput, VectorInput


def _leaf_and_depth(t: pa.DataType) -> tuple[pa.DataType, int]:
    depth = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
        depth += 1
    return t, depth


def _vector_column(name: str, col: pa.ChunkedArray, depth: int) -> list[Any]:
    """Per-row numpy arrays (1-D for single, 2-D for multi) or None for nulls."""
    arr = _one_array(col)
    rows: list[Any] = []
    if depth == 1:
        for i in range(len(arr)):
            item = arr[i]
            rows.append(
                None
                if not item.is_valid
                else np.asarray(item.values.to_numpy(zero_copy_only=False), dtype=np.float32)
            )
        return rows
    if depth != 2:
        raise InvalidInput(f"column {name!r}: vectors must be list<float> or list<list<float>>")
    outer = arr
    for i in range(len(outer)):
        item = outer[i]
        if not item.is_valid:
            rows.append(None)
            continue
        inner = item.values  # list<float> array of this object's token vectors
        if inner.null_count:
            raise InvalidInput(
                f"column {name!r} row {i}: ragged or null token vectors",
                {"vector": name, "index": i},
            )
        lengths = inner.value_lengths().to_numpy(zero_copy_only=False)
        flat = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        if len(lengths) == 0:
            rows.append(np.zeros((0, 0), dtype=np.float32))
            continue
        dim = int(lengths[0])
        if np.any(lengths != dim) or inner.null_count:
            raise InvalidInput(
                f"column {name!r} row {i}: ragged or null token vectors",
                {"vector": name, "index": i},
            )
        rows.append(flat.reshape(len(lengths), dim))
    return rows


def _read_table(body: bytes | memoryview) -> pa.Table:
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(body))  # zero-copy: columns view ``body``
        return reader.read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise BadRequest(f"body is not a readable Arrow IPC stream: {exc}") from exc


def _list_lengths(arr: pa.Array) -> Any:
    """Per-entry lengths of a (fixed size) list array, nulls as 0."""
    if pa.types.is_fixed_size_list(arr.type):
        lengths = np.full(len(arr), arr.type.list_size, dtype=np.int64)
        if arr.null_count:
            lengths[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
        return lengths
    return arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat_floats(arr: pa.Array) -> Any:
    values = arr.flatten()
    if values.null_count:
        return None
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _one_array(col: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is (``combine_chunks`` copies even a
    single chunk: a full copy of every vector of the batch)."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _columnar_vector(col: pa.ChunkedArray, depth: int) -> VectorInput | None:
    """The column as flat values + offsets, or None when it is not rectangular (the
    per-object decoder then reports it)."""
    arr = _one_array(col)
    n = len(arr)
    present = None if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    per_object = _list_lengths(arr)  # tokens (multi) or floats (single) per object
    if depth == 1:
        dims = per_object if present is None else per_object[present]
        if len(dims) == 0 or dims[0] == 0 or (dims != dims[0]).any():
            return None
        dim = int(dims[0])
        flat = _flat_floats(arr)
        rows = np.ones(n, dtype=np.int64) if present is None else present.astype(np.int64)
        if flat is None or len(flat) != int(rows.sum()) * dim:
            return None
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(rows, out=offsets[1:])
        return VectorInput(flat.reshape(-1, dim), offsets, multi=False, present=present)
    if depth != 2:
        return None
    inner = arr.flatten()  # every token vector of the present objects, in order
    if inner.null_count or len(inner) == 0:
        return None
    token_dims = _list_lengths(inner)
    dim = int(token_dims[0])
    if dim == 0 or (token_dims != dim).any():
        return None
    flat = _flat_floats(inner)
    if flat is None or len(flat) != len(inner) * dim:
        return None
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per_object, out=offsets[1:])
    return VectorInput(flat.reshape(-1, dim), offsets, multi=True, present=present)


def batch_from_arrow(body: bytes | memoryview) -> ColumnarInput | list[ObjectInput]:
    """The body as a ``ColumnarInput`` when its vector columns are rectangular, else as
    per-object inputs (``objects_from_arrow``)."""
    table = _read_table(body)
    parts = _split_columns(table)
    if table.num_rows == 0:
        return _objects_from_parts(parts)
    ids, props, vector_columns = parts
    vectors: dict[str, VectorInput] = {}
    for vec_name, _, col, depth in vector_columns:
        vec = _columnar_vector(col, depth)
        if vec is None or vec_name in vectors:
            return _objects_from_parts(parts)
        vectors[vec_name] = vec
    return ColumnarInput(tuple(None if i is None else str(i) for i in ids), tuple(props), vectors)


def objects_from_arrow(body: bytes | memoryview) -> list[ObjectInput]:
    return _objects_from_parts(_split_columns(_read_table(body)))


_Parts = tuple[list[Any], list[dict[str, Any]], list[tuple[str, str, Any, int]]]


def _split_columns(table: pa.Table) -> _Parts:
    """One walk over the columns: the ids, every object's properties, and the vector columns
    as ``(vector name, column name, column, list depth)`` (float leaves at depth ≥ 1)."""
    n = table.num_rows
    ids: list[Any] = [None] * n
    props: list[dict[str, Any]] = [{} for _ in range(n)]
    vector_columns: list[tuple[str, str, Any, int]] = []
    for name in table.column_names:
        col = table.column(name)
        if name == "id":
            ids = col.to_pylist()
            continue
        leaf, depth = _leaf_and_depth(col.type)
        if depth >= 1 and pa.types.is_floating(leaf):
            vector_columns.append((name.removeprefix("vectors."), name, col, depth))
        else:
            prop_name = name.removeprefix("properties.")
            for i, value in enumerate(col.to_pylist()):
                if value is not None:
                    props[i][prop_name] = value
    return ids, props, vector_columns


def _objects_from_parts(parts: _Parts) -> list[ObjectInput]:
    ids, props, vector_columns = parts
    n = len(ids)
    vectors: list[dict[str, Any]] = [{} for _ in range(n)]
    for vec_name, name, col, depth in vector_columns:
        for i, value in enumerate(_vector_column(name, col, depth)):
            if value is not None:
                vectors[i][vec_name] = value
    return [
        ObjectInput(None if ids[i] is None else str(ids[i]), props[i], vectors[i]) for i in range(n)
    ]
