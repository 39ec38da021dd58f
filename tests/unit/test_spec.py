"""cluster/spec.py: collection specs are validated once, from their wire/etcd form."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest

from cluster.errors import InvalidInput, NotFound
from cluster.spec import MAX_DIM, MAX_SHARDS, CollectionSpec, NamedVectorSpec, PropertySpec


def raw_spec(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "DemoCollection",
        "properties": [{"name": "text", "data_type": "text"}, {"name": "year", "data_type": "int"}],
        "vectors": [{"name": "multi_vector", "kind": "multi", "dim": 128}],
    }
    raw.update(overrides)
    return raw


def vector(**fields: Any) -> dict[str, Any]:
    return {"name": "v", "kind": "multi", "dim": 8, **fields}


def invalid(raw: dict[str, Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        CollectionSpec.from_dict(raw)
    assert info.value.code == "invalid_input"
    return info.value


# ---- good inputs ---------------------------------------------------------------------------


def test_minimal_spec_gets_defaults() -> None:
    spec = CollectionSpec.from_dict(raw_spec())
    assert spec.name == "DemoCollection"
    assert (spec.shard_count, spec.replication_factor) == (2, 1)
    v = spec.vectors[0]
    assert (v.kind, v.dim, v.metric, v.dtype) == ("multi", 128, "cosine", "float32")
    assert v.multi and v.vectorizer.kind == "none" and v.index.kind == "scann"
    text, year = spec.properties
    assert text.searchable and text.filterable
    assert not year.searchable and year.filterable  # BM25 only over text by default


def test_round_trip_through_dict_and_json() -> None:
    raw = raw_spec(
        vectors=[
            vector(
                name="colbert",
                metric="dot",
                dtype="float16",
                vectorizer={
                    "kind": "text2colbert-local",
                    "source_properties": ["text"],
                    "options": {"model": "colbert-ir/colbertv2.0"},
                },
                index={"kind": "muvera", "options": {"k_sim": 4}},
            ),
            {"name": "title_vec", "kind": "single", "dim": 3},
        ],
        shard_count=4,
        replication_factor=2,
    )
    spec = CollectionSpec.from_dict(raw)
    assert CollectionSpec.from_dict(spec.to_dict()) == spec
    assert CollectionSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["shard_count"] == 4
    assert spec.vector("colbert").index.options == {"k_sim": 4}
    assert not spec.vector("title_vec").multi


def test_vectorizer_may_leave_dim_to_the_model() -> None:
    spec = CollectionSpec.from_dict(
        raw_spec(
            vectors=[
                {
                    "name": "colbert",
                    "vectorizer": {"kind": "text2colbert-jinaai", "source_properties": ["text"]},
                }
            ]
        )
    )
    assert spec.vectors[0].dim == 0  # filled in when the collection is created


@pytest.mark.parametrize("name", ["A", "a1", "Demo_Collection", "x" * 64])
def test_good_collection_names(name: str) -> None:
    assert CollectionSpec.from_dict(raw_spec(name=name)).name == name


def test_specs_are_frozen() -> None:
    spec = CollectionSpec.from_dict(raw_spec())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.shard_count = 3  # type: ignore[misc]


# ---- bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "1abc", "_x", "a-b", "a b", "a/b", "../x", "é", "x" * 65, None, 7]
)
def test_bad_collection_names(name: Any) -> None:
    invalid(raw_spec(name=name))


@pytest.mark.parametrize("dim", [0, -1, MAX_DIM + 1, "8", 8.0, True, None, [8]])
def test_bad_dims(dim: Any) -> None:
    err = invalid(raw_spec(vectors=[vector(dim=dim)]))
    assert err.details == {"vector": "v"}


def test_dim_bounds_are_inclusive() -> None:
    for dim in (1, MAX_DIM):
        assert CollectionSpec.from_dict(raw_spec(vectors=[vector(dim=dim)])).vectors[0].dim == dim


@pytest.mark.parametrize(
    "field,value",
    [
        ("metric", "l2"),
        ("metric", "COSINE"),
        ("metric", None),
        ("dtype", "int8"),
        ("dtype", "float64"),
        ("kind", "sparse"),
        ("kind", "multi_vector"),
    ],
)
def test_bad_vector_settings(field: str, value: Any) -> None:
    invalid(raw_spec(vectors=[vector(**{field: value})]))


@pytest.mark.parametrize(
    "prop",
    [
        {"name": "p", "data_type": "float"},
        {"name": "p", "data_type": None},
        {"name": "p"},
        {"name": "1p", "data_type": "text"},
        {"name": "p-q", "data_type": "text"},
        {"name": "p", "data_type": "text", "searchable": "yes"},
        {"name": "p", "data_type": "text", "filterable": 1},
        "p",
    ],
)
def test_bad_properties(prop: Any) -> None:
    invalid(raw_spec(properties=[prop]))


def test_duplicate_names_are_rejected() -> None:
    err = invalid(
        raw_spec(properties=[{"name": "a", "data_type": "text"}, {"name": "a", "data_type": "int"}])
    )
    assert err.details == {"names": ["a"]}
    err = invalid(raw_spec(vectors=[vector(name="v"), vector(name="v", dim=4)]))
    assert err.details == {"names": ["v"]}


@pytest.mark.parametrize(
    "raw",
    [
        raw_spec(shards=2),
        raw_spec(properties=[{"name": "t", "data_type": "text", "tokenizer": "word"}]),
        raw_spec(vectors=[vector(distance="dot")]),
        raw_spec(vectors=[vector(vectorizer={"kind": "none", "model": "x"})]),
        raw_spec(vectors=[vector(index={"kind": "scann", "num_leaves": 10})]),
    ],
)
def test_unknown_fields_are_rejected(raw: dict[str, Any]) -> None:
    assert "unknown field" in invalid(raw).message


def test_vectorizer_source_properties_must_exist() -> None:
    err = invalid(
        raw_spec(
            vectors=[
                vector(
                    vectorizer={"kind": "text2colbert-local", "source_properties": ["text", "body"]}
                )
            ]
        )
    )
    assert err.details == {"vector": "v", "properties": ["body"]}


@pytest.mark.parametrize(
    "vectorizer",
    [
        {"kind": "openai"},
        {"kind": "none", "source_properties": "text"},
        {"kind": "none", "source_properties": [1]},
        {"kind": "none", "options": []},
        "none",
    ],
)
def test_bad_vectorizers(vectorizer: Any) -> None:
    invalid(raw_spec(vectors=[vector(vectorizer=vectorizer)]))


@pytest.mark.parametrize("index", [{"kind": "hnsw"}, {"options": "fast"}, ["scann"]])
def test_bad_index(index: Any) -> None:
    invalid(raw_spec(vectors=[vector(index=index)]))


@pytest.mark.parametrize(
    "overrides",
    [
        {"shard_count": 0},
        {"shard_count": MAX_SHARDS + 1},
        {"shard_count": True},
        {"shard_count": "2"},
        {"replication_factor": 0},
        {"replication_factor": 4},
        {"vectors": []},
        {"vectors": {}},
        {"properties": {"name": "p"}},
    ],
)
def test_bad_collection_level_values(overrides: dict[str, Any]) -> None:
    invalid(raw_spec(**overrides))


def test_not_an_object() -> None:
    with pytest.raises(InvalidInput):
        CollectionSpec.from_dict([])  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # not JSON at all
        CollectionSpec.from_json("{")


# ---- lookups -------------------------------------------------------------------------------


def test_vector_and_property_lookup() -> None:
    one = CollectionSpec.from_dict(raw_spec())
    assert one.vector(None).name == "multi_vector"
    assert isinstance(one.vector("multi_vector"), NamedVectorSpec)
    assert isinstance(one.property("text"), PropertySpec)
    with pytest.raises(NotFound):
        one.vector("nope")
    with pytest.raises(NotFound):
        one.property("nope")

    two = CollectionSpec.from_dict(raw_spec(vectors=[vector(name="a"), vector(name="b")]))
    with pytest.raises(InvalidInput) as info:
        two.vector(None)
    assert info.value.details == {"vectors": ["a", "b"]}


def test_routing_version_new_collections_latest_stored_specs_keep_theirs() -> None:
    from cluster.ids import ROUTING_LATEST, ROUTING_LEGACY

    raw = {"name": "R", "vectors": [{"name": "v", "dim": 4}], "shard_count": 4}
    new = CollectionSpec.from_dict(raw)
    assert new.routing == ROUTING_LATEST
    assert CollectionSpec.from_json(new.to_json()).routing == ROUTING_LATEST
    # A spec stored before routing versions existed has no "routing": it keeps version 1.
    old_json = json.dumps({k: v for k, v in new.to_dict().items() if k != "routing"})
    old = CollectionSpec.from_json(old_json)
    assert old.routing == ROUTING_LEGACY
    ids = [str(uuid.UUID(int=i)) for i in range(400)]
    assert {old.shard_for(i) for i in ids} == {0}
    assert {new.shard_for(i) for i in ids} == {0, 1, 2, 3}
    with pytest.raises(InvalidInput):
        CollectionSpec.from_dict({**raw, "routing": 9})
