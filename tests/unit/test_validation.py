from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from cluster.errors import InvalidInput, NotFound
from cluster.spec import CollectionSpec
from cluster.validation import ObjectInput, prepare_batch, prepare_query_vector

SPEC = CollectionSpec.from_dict(
    {
        "name": "Demo",
        "properties": [
            {"name": "text", "data_type": "text"},
            {"name": "n", "data_type": "int"},
            {"name": "x", "data_type": "number"},
            {"name": "ok", "data_type": "boolean"},
            {"name": "tags", "data_type": "text[]"},
            {"name": "d", "data_type": "date"},
        ],
        "vectors": [
            {"name": "mv", "kind": "multi", "dim": 4, "metric": "cosine"},
            {"name": "sv", "kind": "single", "dim": 3, "metric": "dot"},
        ],
    }
)


def obj(**kw: Any) -> ObjectInput:
    vectors = kw.pop("vectors", {"mv": np.ones((2, 4)), "sv": np.array([1.0, 2.0, 3.0])})
    return ObjectInput(kw.pop("uuid", None), kw.pop("properties", {}), vectors)


def test_good_batch_is_normalised_and_flat() -> None:
    batch = prepare_batch(
        SPEC,
        [
            obj(
                properties={
                    "text": "hi",
                    "n": 3,
                    "x": 2,
                    "ok": True,
                    "tags": ["a"],
                    "d": "2024-01-02T03:04:05Z",
                }
            ),
            obj(vectors={"mv": np.ones((5, 4)), "sv": [0.0, 0.0, 1.0]}),
        ],
    )
    assert len(batch) == 2
    mv = batch.vectors["mv"]
    assert mv.values.shape == (7, 4) and list(mv.offsets) == [0, 2, 7]
    assert np.allclose(np.linalg.norm(mv.values, axis=1), 1.0)  # cosine: unit rows
    assert batch.vectors["sv"].values[0].tolist() == [1.0, 2.0, 3.0]  # dot: as given
    assert batch.properties[0]["x"] == 2.0


@pytest.mark.parametrize(
    "vectors, message",
    [
        ({"mv": np.ones((2, 5)), "sv": [1.0, 2.0, 3.0]}, "expected dim 4"),
        ({"mv": np.zeros((0, 4)), "sv": [1.0, 2.0, 3.0]}, "empty"),
        ({"mv": np.array([[1, 2, 3, math.nan]]), "sv": [1.0, 2.0, 3.0]}, "NaN"),
        ({"mv": np.array([[1, 2, 3, math.inf]]), "sv": [1.0, 2.0, 3.0]}, "NaN or Inf"),
        ({"mv": np.ones(4), "sv": [1.0, 2.0, 3.0]}, "multi-vector must be"),
        ({"mv": np.ones((1, 4)), "sv": [[1.0, 2.0, 3.0]]}, "single vector must be"),
        ({"mv": [[1.0, 2.0, 3.0, 4.0], [1.0]], "sv": [1.0, 2.0, 3.0]}, "ragged"),
        ({"sv": [1.0, 2.0, 3.0]}, "missing vector 'mv'"),
        ({"mv": np.ones((1, 4)), "sv": [1.0, 2.0, 3.0], "other": [1.0]}, "no named vector"),
    ],
)
def test_bad_vectors_rejected(vectors: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        prepare_batch(SPEC, [obj(), obj(vectors=vectors)])
    assert info.value.details["index"] == 1


@pytest.mark.parametrize(
    "props",
    [
        {"text": 3},
        {"n": 1.5},
        {"n": True},
        {"x": "1"},
        {"x": math.inf},
        {"ok": 1},
        {"tags": "a"},
        {"tags": [1]},
        {"d": "yesterday"},
        {"d": "2024-01-01T00:00:00"},
        {"unknown": 1},
    ],
)
def test_bad_properties_rejected(props: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        prepare_batch(SPEC, [obj(properties=props)])


def test_ids_are_validated_and_unique() -> None:
    with pytest.raises(InvalidInput, match="invalid uuid"):
        prepare_batch(SPEC, [obj(uuid="nope")])
    u = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    with pytest.raises(InvalidInput, match="duplicate id"):
        prepare_batch(SPEC, [obj(uuid=u), obj(uuid=u.upper())])
    with pytest.raises(InvalidInput, match="no objects"):
        prepare_batch(SPEC, [])


def test_query_vector_validation() -> None:
    q = prepare_query_vector(SPEC, "mv", np.ones((3, 4)))
    assert q.shape == (3, 4) and np.allclose(np.linalg.norm(q, axis=1), 1.0)
    assert prepare_query_vector(SPEC, "sv", [1.0, 2.0, 3.0]).shape == (1, 3)
    with pytest.raises(NotFound):
        prepare_query_vector(SPEC, "nope", np.ones((3, 4)))
    with pytest.raises(InvalidInput, match="several named vectors"):
        prepare_query_vector(SPEC, None, np.ones((3, 4)))
    with pytest.raises(InvalidInput):
        prepare_query_vector(SPEC, "mv", np.ones((3, 2)))


def test_float16_vectors_must_fit_float16() -> None:
    spec = CollectionSpec.from_dict(
        {
            "name": "H",
            "vectors": [
                {"name": "mv", "kind": "multi", "dim": 4, "metric": "dot", "dtype": "float16"}
            ],
        }
    )
    kept = prepare_batch(spec, [ObjectInput(None, {}, {"mv": np.full((2, 4), -65504.0)})])
    assert kept.vectors["mv"].values.min() == -65504.0  # float16's largest finite magnitude
    with pytest.raises(InvalidInput, match="float16") as info:
        prepare_batch(
            spec,
            [
                ObjectInput(None, {}, {"mv": np.ones((2, 4))}),
                ObjectInput(None, {}, {"mv": [[1.0, 2.0, 3.0, 65520.0]]}),
            ],
        )
    assert info.value.details == {"vector": "mv", "index": 1}
