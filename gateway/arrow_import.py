"""Arrow IPC stream import: decode ``application/vnd.apache.arrow.stream`` bodies into objects.

Columns: ``id`` (string, optional), one column per property (by name), and one column per named
vector: ``list<list<float>>`` (multi-vector, or ``list<fixed_size_list<float>>``) or
``list<float>`` / ``fixed_size_list<float>`` (single vector). A column is a vector when its leaf
type is floating point (no property type is a float list); a ``vectors.`` prefix is stripped.
Vectors are sliced out of the column's flat buffer — no per-float Python objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from cluster.errors import BadRequest, InvalidInput
from cluster.validation import ObjectInput


def _leaf_and_depth(t: pa.DataType) -> tuple[pa.DataType, int]:
    depth = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
        depth += 1
    return t, depth


def _vector_column(name: str, col: pa.ChunkedArray, depth: int) -> list[Any]:
    """Per-row numpy arrays (1-D for single, 2-D for multi) or None for nulls."""
    arr = col.combine_chunks()
    rows: list[Any] = []
    if depth == 1:
        for i in range(len(arr)):
            item = arr[i]
            rows.append(None if not item.is_valid else
                        np.asarray(item.values.to_numpy(zero_copy_only=False), dtype=np.float32))
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
        lengths = inner.value_lengths().to_numpy(zero_copy_only=False)
        flat = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        if len(lengths) == 0:
            rows.append(np.zeros((0, 0), dtype=np.float32))
            continue
        dim = int(lengths[0])
        if np.any(lengths != dim) or inner.null_count:
            raise InvalidInput(f"column {name!r} row {i}: ragged or null token vectors",
                               {"vector": name, "index": i})
        rows.append(flat.reshape(len(lengths), dim))
    return rows


def objects_from_arrow(body: bytes) -> list[ObjectInput]:
    try:
        reader = pa.ipc.open_stream(body)
        table = reader.read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise BadRequest(f"body is not a readable Arrow IPC stream: {exc}") from exc
    n = table.num_rows
    ids: list[Any] = [None] * n
    props: list[dict[str, Any]] = [{} for _ in range(n)]
    vectors: list[dict[str, Any]] = [{} for _ in range(n)]
    for name in table.column_names:
        col = table.column(name)
        if name == "id":
            ids = col.to_pylist()
            continue
        leaf, depth = _leaf_and_depth(col.type)
        if depth >= 1 and pa.types.is_floating(leaf):
            vec_name = name.removeprefix("vectors.")
            for i, value in enumerate(_vector_column(name, col, depth)):
                if value is not None:
                    vectors[i][vec_name] = value
        else:
            prop_name = name.removeprefix("properties.")
            for i, value in enumerate(col.to_pylist()):
                if value is not None:
                    props[i][prop_name] = value
    return [ObjectInput(None if ids[i] is None else str(ids[i]), props[i], vectors[i])
            for i in range(n)]
