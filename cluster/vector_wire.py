"""Vectors in JSON bodies in binary form: ``{"base64": "...", "shape": [n_tokens, dim]}``.

Wherever a request takes a vector as a list of floats (or a multi-vector as a list of lists),
it also takes this object: the values as little-endian float32, row-major, base64-encoded
(RFC 4648, padded), and the shape (``[dim]`` for a single vector, ``[n_tokens, dim]`` for a
multi-vector). A 32×128 query is 22 KB this way instead of ~44 KB of decimal text, and it is
parsed in ~0.1 ms less on each side (measured: server 175 → 100 µs, client 73 → 25 µs). The
SDK sends its vectors so; lists stay accepted everywhere.

The decoded values are checked like listed ones afterwards (dims, NaN/Inf, limits), so the
two forms are accepted and rejected alike.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.errors import InvalidInput

KEYS = frozenset({"base64", "shape"})
ITEM_BYTES = 4  # float32


def encode(value: Any) -> dict[str, Any]:
    """``value`` (a 1-D or 2-D array or nested list of numbers) in the binary form."""
    array = np.ascontiguousarray(value, dtype="<f4")
    if array.ndim not in (1, 2):
        raise ValueError(f"a vector is 1-D or 2-D, got {array.ndim}-D")
    return {"base64": base64.b64encode(array.data).decode("ascii"), "shape": list(array.shape)}


def is_encoded(value: Any) -> bool:
    return isinstance(value, Mapping)


def decode(value: Mapping[str, Any], what: str) -> npt.NDArray[np.float32]:
    """The float32 array a binary-form vector holds (writable, C order); ``InvalidInput``
    naming ``what`` when the object is malformed."""
    details: dict[str, Any] = {"vector": what}
    if set(value) != KEYS:
        raise InvalidInput(
            f'{what}: a binary vector is {{"base64": ..., "shape": [...]}}, '
            f"got keys {sorted(value)}",
            details,
        )
    shape, text = value["shape"], value["base64"]
    if (
        not isinstance(shape, list)
        or len(shape) not in (1, 2)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise InvalidInput(
            f"{what}: shape must be [dim] or [n_tokens, dim] (non-negative integers)",
            {**details, "shape": repr(shape)[:100]},
        )
    if not isinstance(text, str):
        raise InvalidInput(f"{what}: base64 must be a string", details)
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{what}: base64 does not decode ({exc})", details) from None
    expected = math.prod(shape) * ITEM_BYTES
    if len(raw) != expected:
        raise InvalidInput(
            f"{what}: {len(raw)} bytes decoded, shape {shape} needs {expected} "
            "(little-endian float32)",
            {**details, "bytes": len(raw), "expected_bytes": expected},
        )
    return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
