"""The binary form of vectors in JSON bodies (``cluster.vector_wire``) and the SDK's use of it."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from cluster import vector_wire
from cluster.errors import InvalidInput
from gateway.client import _wire_vector


@pytest.mark.parametrize("shape", [(5,), (1, 8), (32, 128), (0, 4)])
def test_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    values = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    encoded = vector_wire.encode(values)
    assert encoded["shape"] == list(shape)
    assert len(base64.b64decode(encoded["base64"])) == values.nbytes
    decoded = vector_wire.decode(encoded, "v")
    assert decoded.dtype == np.float32 and decoded.shape == shape
    assert np.array_equal(decoded, values)
    assert decoded.flags.writeable and decoded.flags.c_contiguous


def test_encode_takes_lists_other_dtypes_and_non_contiguous_arrays() -> None:
    values = np.arange(24, dtype=np.float64).reshape(4, 6)
    for given in (values.tolist(), values, values[:, ::2], values.astype(np.int32)):
        expected = np.asarray(given, dtype=np.float32)
        assert np.array_equal(vector_wire.decode(vector_wire.encode(given), "v"), expected)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        vector_wire.encode(np.zeros((2, 2, 2)))


def test_nan_and_inf_travel_as_they_are_for_the_server_to_reject() -> None:
    values = np.array([[np.nan, np.inf, -np.inf, 1.0]], dtype=np.float32)
    decoded = vector_wire.decode(vector_wire.encode(values), "v")
    assert np.isnan(decoded[0, 0]) and np.isinf(decoded[0, 1:3]).all()


GOOD = vector_wire.encode(np.ones((2, 4), dtype=np.float32))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"base64": GOOD["base64"]}, "got keys"),
        ({**GOOD, "dtype": "float32"}, "got keys"),
        (
            {"base64": GOOD["base64"], "shape": [2, 5]},
            "32 bytes decoded, shape \\[2, 5\\] needs 40",
        ),
        ({"base64": GOOD["base64"], "shape": [2, 4, 1]}, "shape must be"),
        ({"base64": GOOD["base64"], "shape": []}, "shape must be"),
        ({"base64": GOOD["base64"], "shape": "2,4"}, "shape must be"),
        ({"base64": GOOD["base64"], "shape": [2, -4]}, "shape must be"),
        ({"base64": GOOD["base64"], "shape": [True, 8]}, "shape must be"),
        ({"base64": GOOD["base64"], "shape": [2.0, 4]}, "shape must be"),
        ({"base64": GOOD["base64"], "shape": [10**12, 128]}, "needs 512000000000000"),
        ({"base64": 12, "shape": [2, 4]}, "must be a string"),
        ({"base64": "@@@@", "shape": [1]}, "does not decode"),
        ({"base64": GOOD["base64"][:-1], "shape": [2, 4]}, "does not decode"),
        ({"base64": GOOD["base64"] + " ", "shape": [2, 4]}, "does not decode"),
        ({"base64": "üüüü", "shape": [1]}, "does not decode"),
    ],
)
def test_malformed_binary_vectors_are_invalid_input_naming_the_field(
    value: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        vector_wire.decode(value, "near_vector.vector")
    assert "near_vector.vector" in info.value.message
    assert info.value.details["vector"] == "near_vector.vector"


def test_the_sdk_sends_numeric_vectors_in_binary_form_and_the_rest_as_given() -> None:
    matrix = np.random.default_rng(1).normal(size=(3, 4))
    for given in (matrix, matrix.tolist(), matrix[0], [1, 2, 3]):
        sent = _wire_vector(given)
        assert set(sent) == {"base64", "shape"}
        assert np.array_equal(vector_wire.decode(sent, "v"), np.asarray(given, np.float32))
    # What the server must name (ragged rows, strings, wrong nesting) goes as given.
    for odd in ([[1.0, 2.0], [3.0]], [["a", "b"]], [[[1.0]]], [True, False]):
        assert _wire_vector(odd) == odd
    assert _wire_vector(np.array([[1.0, 2.0]], dtype=np.float16)) == vector_wire.encode(
        [[1.0, 2.0]]
    )
    huge = _wire_vector([[1e39, 1.0]])  # beyond float32: inf, which the server rejects
    assert np.isinf(vector_wire.decode(huge, "v")[0, 0])
