"""Request limits: the one place that decides each limit and its error code.

The gateway checks them before anything reaches the coordinator; the coordinator checks the
ones it must hold itself (batch size, page) with these same functions, so a request over a limit
gets the same code and details whichever layer sees it first. Every limit comes from
``Settings`` (``colshard serve``/``gateway`` flags) and fails with a clear 4xx naming the limit in
``details``:

=========================  ===========================  =====  ==============================
what                       setting (flag)               code   default
=========================  ===========================  =====  ==============================
request body               max_body_bytes               413    64 MiB (``--max-body-mb``)
objects per batch          max_batch_objects            413    10,000
tokens per object          max_tokens_per_object        422    65,536 (``0``: no limit)
vector dimension           max_dim                      422    65,536
tokens per query vector    max_query_tokens             422    4,096
``limit`` / ``offset``     max_limit                    422    10,000
filter depth / nodes       max_filter_depth / _nodes    422    16 / 1,024
shards per collection      max_shards                   422    256
collections per cluster    max_collections              422    1,000 (checked by the
                                                               coordinator, which knows them)
properties / named vectors max_properties / max_vectors 422    1,024 / 64
objects to vectorize       max_vectorize_objects        413    2,000 (checked by the
                                                               coordinator, which knows the
                                                               schema)
coordinator call           query_timeout_s /            504    30 s / 120 s
                           write_timeout_s
=========================  ===========================  =====  ==============================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cluster.errors import InvalidInput, PayloadTooLarge
from cluster.settings import Settings
from cluster.validation import ColumnarInput, ObjectInput


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    try:
        return tuple(int(d) for d in np.shape(value))
    except ValueError:
        return ()  # ragged: the structural check rejects it with its own message


def check_matrix(value: Any, what: str, *, max_tokens: int, max_dim: int) -> None:
    """A 1-D vector or 2-D multi-vector: rows (tokens) and row length (dim) within limits."""
    if value is None:
        return
    shape = _shape(value)
    if not shape:
        return  # a scalar: the spec check names it later
    dim = shape[-1]
    if dim > max_dim:
        raise InvalidInput(
            f"{what}: dimension {dim} exceeds the limit of {max_dim}",
            {"limit": "max_dim", "max": max_dim, "got": dim},
        )
    tokens = shape[0] if len(shape) >= 2 else 1
    if max_tokens > 0 and tokens > max_tokens:
        raise InvalidInput(
            f"{what}: {tokens} tokens exceed the limit of {max_tokens} per vector",
            {"limit": "tokens", "max": max_tokens, "got": tokens},
        )


def check_batch_size(n: int, settings: Settings) -> None:
    cap = settings.max_batch_objects
    if n > cap:
        raise PayloadTooLarge(
            f"batch of {n} objects exceeds the limit of {cap} objects; split it",
            {"limit": "max_batch_objects", "max": cap, "got": n},
        )


def check_objects(inputs: Sequence[ObjectInput] | ColumnarInput, settings: Settings) -> None:
    check_batch_size(len(inputs), settings)
    if isinstance(inputs, ColumnarInput):
        # One look per column; over a limit, the per-object check names the first offender.
        max_tokens = settings.max_tokens_per_object
        if not any(
            col.values.shape[-1] > settings.max_dim
            or (
                max_tokens > 0
                and len(col.offsets) > 1
                and int(np.diff(col.offsets).max()) > max_tokens
            )
            for col in inputs.vectors.values()
        ):
            return
        inputs = inputs.to_objects()
    for i, obj in enumerate(inputs):
        for name, value in obj.vectors.items():
            check_matrix(
                value,
                f"objects[{i}].vectors.{name}",
                max_tokens=settings.max_tokens_per_object,
                max_dim=settings.max_dim,
            )


def check_query_vector(value: Any, what: str, settings: Settings) -> None:
    check_matrix(value, what, max_tokens=settings.max_query_tokens, max_dim=settings.max_dim)


def check_page(limit: int, offset: int, settings: Settings) -> None:
    cap = settings.max_limit
    if not 0 < limit <= cap:
        raise InvalidInput(
            f"limit must be in 1..{cap}", {"limit": "max_limit", "max": cap, "got": limit}
        )
    if not 0 <= offset <= cap:
        raise InvalidInput(
            f"offset must be in 0..{cap}", {"limit": "max_limit", "max": cap, "got": offset}
        )


def check_filter(raw: Any, settings: Settings) -> None:
    """Depth (a lone condition is depth 1, as in ``cluster.filters``) and node count of a
    filter tree, checked structurally before it is parsed against the schema."""
    if raw is None:
        return
    max_depth, max_nodes = settings.max_filter_depth, settings.max_filter_nodes
    nodes = 0
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise InvalidInput(
                f"filters: nested deeper than {max_depth} levels",
                {"limit": "max_filter_depth", "max": max_depth},
            )
        nodes += 1
        if isinstance(node, dict):
            operands = node.get("operands")
            if isinstance(operands, list):
                stack.extend((o, depth + 1) for o in operands)
            value = node.get("value")
            if isinstance(value, list):
                nodes += len(value)  # a list value counts one node per element
        if nodes > max_nodes:
            raise InvalidInput(
                f"filters: more than {max_nodes} nodes (conditions, logical "
                f"operators and list values)",
                {"limit": "max_filter_nodes", "max": max_nodes},
            )


def check_collection(body: dict[str, Any], settings: Settings) -> None:
    for key, cap, limit in (
        ("properties", settings.max_properties, "max_properties"),
        ("vectors", settings.max_vectors, "max_vectors"),
    ):
        n = len(body.get(key) or [])
        if n > cap:
            raise InvalidInput(
                f"{n} {key} exceed the limit of {cap} per collection",
                {"limit": limit, "max": cap, "got": n},
            )
    shards = body.get("shard_count")
    if isinstance(shards, int) and shards > settings.max_shards:
        raise InvalidInput(
            f"shard_count {shards} exceeds the limit of {settings.max_shards}",
            {"limit": "max_shards", "max": settings.max_shards, "got": shards},
        )
    for vec in body.get("vectors") or []:
        dim = vec.get("dim") if isinstance(vec, dict) else None
        if isinstance(dim, int) and dim > settings.max_dim:
            raise InvalidInput(
                f"vector {vec.get('name')!r}: dim {dim} exceeds the limit of {settings.max_dim}",
                {"limit": "max_dim", "max": settings.max_dim, "got": dim},
            )


def check_collection_count(existing: int, settings: Settings) -> None:
    """A new collection fits under ``max_collections`` (the coordinator counts them)."""
    cap = settings.max_collections
    if existing >= cap:
        raise InvalidInput(
            f"the cluster holds {existing} collections, the limit is {cap}; drop one first "
            f"or raise --max-collections",
            {"limit": "max_collections", "max": cap, "got": existing + 1},
        )
