"""cluster/snapshot.py: the etcd key layout and the immutable ClusterSnapshot built from it."""

from __future__ import annotations

import json
import pickle

import pytest

from cluster.errors import InvalidInput
from cluster.snapshot import ClusterSnapshot, FrozenMap, KeyLayout, freeze_json, thaw_json
from cluster.spec import CollectionSpec

LAYOUT = KeyLayout("prod")
SPEC = CollectionSpec.from_dict({"name": "Docs", "vectors": [{"name": "v", "dim": 4}]})


def items() -> list[tuple[str, bytes]]:
    return [
        (LAYOUT.collection("Docs"), SPEC.to_json().encode()),
        (LAYOUT.placement("Docs", 1, 0), b'{"actor": "colshard:Docs:1", "tags": ["a", "b"]}'),
        (LAYOUT.placement("Docs", 0, 1), b'{"actor": "colshard:Docs:0:1"}'),
        (LAYOUT.member("node-1"), b'{"host": "10.0.0.1", "gpus": {"count": 1}}'),
        (LAYOUT.leader, b"coord-7"),
    ]


def test_key_layout() -> None:
    assert LAYOUT.root == "/colshard/prod/"
    assert LAYOUT.collection("Docs") == "/colshard/prod/collections/Docs"
    assert LAYOUT.placement("Docs", 3, 1) == "/colshard/prod/placement/Docs/3/1"
    assert LAYOUT.placement_prefix("Docs") == "/colshard/prod/placement/Docs/"
    assert LAYOUT.member("node-1") == "/colshard/prod/members/node-1"
    assert LAYOUT.leader == "/colshard/prod/leader"


@pytest.mark.parametrize(
    "call",
    [
        lambda: KeyLayout("a/b"),
        lambda: KeyLayout(""),
        lambda: KeyLayout("../x"),
        lambda: LAYOUT.collection("a/b"),
        lambda: LAYOUT.placement("Docs", -1, 0),
        lambda: LAYOUT.placement("Docs", 0, True),
        lambda: LAYOUT.member("a/b"),
        lambda: LAYOUT.member(""),
    ],
)
def test_key_layout_rejects_names_that_would_escape_their_prefix(call: object) -> None:
    with pytest.raises(InvalidInput):
        call()  # type: ignore[operator]


def test_from_items_parses_every_kind_of_key() -> None:
    snap = ClusterSnapshot.from_items(LAYOUT, 42, items())
    assert snap.revision == 42
    assert snap.collections == {"Docs": SPEC}
    assert list(snap.placements["Docs"]) == [(0, 1), (1, 0)]  # sorted
    assert snap.placements["Docs"][(1, 0)]["tags"] == ("a", "b")
    assert snap.members["node-1"]["gpus"]["count"] == 1
    assert snap.leader == "coord-7"


def test_from_items_skips_foreign_and_corrupt_keys() -> None:
    noise = [
        ("/colshard/other/collections/Docs", SPEC.to_json().encode()),  # another cluster
        (LAYOUT.root + "collections/Bad", b"{not json"),
        (LAYOUT.root + "collections/Invalid", json.dumps({"name": "Invalid"}).encode()),
        (LAYOUT.root + "placement/Docs/x/0", b"{}"),
        (LAYOUT.root + "placement/Docs/0", b"{}"),
        (LAYOUT.root + "members/n2", b"[1, 2]"),
        (LAYOUT.root + "something-new/k", b"v"),
    ]
    snap = ClusterSnapshot.from_items(LAYOUT, 7, items() + noise)
    assert set(snap.collections) == {"Docs"}
    assert set(snap.placements["Docs"]) == {(0, 1), (1, 0)}
    assert set(snap.members) == {"node-1"}


def test_snapshot_is_deeply_immutable() -> None:
    snap = ClusterSnapshot.from_items(LAYOUT, 1, items())
    with pytest.raises(TypeError):
        snap.collections["X"] = SPEC  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.members["node-1"]["host"] = "evil"  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.revision = 2  # type: ignore[misc]


def test_snapshot_pickles_for_ray() -> None:
    snap = ClusterSnapshot.from_items(LAYOUT, 3, items())
    copy = pickle.loads(pickle.dumps(snap))
    assert copy == snap
    assert isinstance(copy.members["node-1"], FrozenMap)


def test_same_state_ignores_revision() -> None:
    a = ClusterSnapshot.from_items(LAYOUT, 3, items())
    b = ClusterSnapshot.from_items(LAYOUT, 9, items())
    assert a != b and a.same_state(b)
    c = ClusterSnapshot.from_items(LAYOUT, 9, items()[:-1])  # no leader
    assert not a.same_state(c)
    assert ClusterSnapshot(revision=0).same_state(ClusterSnapshot.from_items(LAYOUT, 5, []))


def test_freeze_and_thaw_json() -> None:
    value = {"a": [1, {"b": [2, 3]}], "c": None}
    frozen = freeze_json(value)
    assert isinstance(frozen, FrozenMap) and frozen["a"][1]["b"] == (2, 3)
    assert thaw_json(frozen) == value
    assert repr(FrozenMap({"k": 1})) == "FrozenMap({'k': 1})"
