"""The cluster state's key layout in etcd and its immutable, versioned view (``ClusterSnapshot``).

Layout under ``/colshard/<cluster_name>/``::

    collections/<name>                     CollectionSpec JSON
    placement/<collection>/<shard>/<replica>   JSON: actor name, node id, state, data dir
    members/<node_id>                      JSON, bound to the node's lease (gone when it dies)
    leader                                 holder name, bound to the leader's lease

Plain Python: no etcd client here. ``cluster.etcd_store`` reads raw key/values and builds the
snapshot with ``ClusterSnapshot.from_items``, so the parsing is unit-testable without etcd.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cluster.errors import InvalidInput
from cluster.ids import validate_collection_name
from cluster.spec import CollectionSpec

log = logging.getLogger(__name__)

ROOT = "/colshard/"
CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only mapping that, unlike ``MappingProxyType``, pickles (snapshots cross Ray)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(data)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._data,))


def freeze_json(value: Any) -> Any:
    """Deep-freeze a JSON value: objects become ``FrozenMap``, arrays become tuples."""
    if isinstance(value, Mapping):
        return FrozenMap((str(k), freeze_json(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(freeze_json(v) for v in value)
    return value


def validate_cluster_name(name: str) -> str:
    if not isinstance(name, str) or not CLUSTER_NAME_RE.match(name):
        raise InvalidInput(
            f"invalid cluster name {name!r}: must match {CLUSTER_NAME_RE.pattern}", {"name": name}
        )
    return name


def validate_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not NODE_ID_RE.match(node_id):
        raise InvalidInput(
            f"invalid node id {node_id!r}: must match {NODE_ID_RE.pattern}", {"node_id": node_id}
        )
    return node_id


@dataclass(frozen=True)
class KeyLayout:
    """Every etcd key colshard writes, in one place."""

    cluster_name: str

    def __post_init__(self) -> None:
        validate_cluster_name(self.cluster_name)

    @property
    def root(self) -> str:
        return f"{ROOT}{self.cluster_name}/"

    def collection(self, name: str) -> str:
        return f"{self.root}collections/{validate_collection_name(name)}"

    @property
    def collections_prefix(self) -> str:
        return f"{self.root}collections/"

    def placement_prefix(self, collection: str) -> str:
        # Trailing slash: "placement/Foo/" must not match "placement/FooBar/...".
        return f"{self.root}placement/{validate_collection_name(collection)}/"

    def placement(self, collection: str, shard: int, replica: int) -> str:
        for what, value in (("shard", shard), ("replica", replica)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"{what} must be a non-negative integer", {what: value})
        return f"{self.placement_prefix(collection)}{shard}/{replica}"

    def member(self, node_id: str) -> str:
        return f"{self.root}members/{validate_node_id(node_id)}"

    @property
    def members_prefix(self) -> str:
        return f"{self.root}members/"

    @property
    def leader(self) -> str:
        return f"{self.root}leader"


def _decode_json_object(key: str, value: bytes) -> Mapping[str, Any] | None:
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring etcd key %s: value is not JSON", key)
        return None
    if not isinstance(obj, dict):
        log.warning("ignoring etcd key %s: value is not a JSON object", key)
        return None
    return obj


@dataclass(frozen=True)
class ClusterSnapshot:
    """The whole cluster state under one prefix, as of one etcd ``revision``. Immutable: nested
    JSON objects are ``FrozenMap`` and arrays are tuples. Consumers hold a snapshot and swap it
    for the next one; nobody mutates it."""

    revision: int
    collections: Mapping[str, CollectionSpec] = field(default_factory=FrozenMap)
    # collection -> (shard, replica) -> placement info
    placements: Mapping[str, Mapping[tuple[int, int], Mapping[str, Any]]] = field(
        default_factory=FrozenMap
    )
    members: Mapping[str, Mapping[str, Any]] = field(default_factory=FrozenMap)
    leader: str | None = None

    def same_state(self, other: ClusterSnapshot) -> bool:
        """Equal content, whatever the revisions."""
        return (
            dict(self.collections) == dict(other.collections)
            and _plain(self.placements) == _plain(other.placements)
            and _plain(self.members) == _plain(other.members)
            and self.leader == other.leader
        )

    @classmethod
    def from_items(
        cls, layout: KeyLayout, revision: int, items: Iterable[tuple[str, bytes]]
    ) -> ClusterSnapshot:
        """Build from raw ``(key, value)`` pairs under ``layout.root``. Keys that do not parse
        (foreign or corrupt) are logged and skipped: one bad key must not blind the cluster."""
        collections: dict[str, CollectionSpec] = {}
        placements: dict[str, dict[tuple[int, int], Mapping[str, Any]]] = {}
        members: dict[str, Mapping[str, Any]] = {}
        leader: str | None = None
        for key, value in items:
            if not key.startswith(layout.root):
                continue
            parts = key[len(layout.root) :].split("/")
            if parts[0] == "collections" and len(parts) == 2:
                try:
                    collections[parts[1]] = CollectionSpec.from_json(value)
                except (InvalidInput, ValueError, UnicodeDecodeError) as exc:
                    log.warning("ignoring etcd key %s: invalid collection spec: %s", key, exc)
            elif parts[0] == "placement" and len(parts) == 4:
                try:
                    shard, replica = int(parts[2]), int(parts[3])
                except ValueError:
                    log.warning("ignoring etcd key %s: bad shard/replica", key)
                    continue
                info = _decode_json_object(key, value)
                if info is not None:
                    placements.setdefault(parts[1], {})[(shard, replica)] = freeze_json(info)
            elif parts[0] == "members" and len(parts) == 2:
                info = _decode_json_object(key, value)
                if info is not None:
                    members[parts[1]] = freeze_json(info)
            elif parts == ["leader"]:
                leader = value.decode("utf-8", errors="replace")
        return cls(
            revision=revision,
            collections=FrozenMap(sorted(collections.items())),
            placements=FrozenMap(
                (name, FrozenMap(sorted(reps.items()))) for name, reps in sorted(placements.items())
            ),
            members=FrozenMap(sorted(members.items())),
            leader=leader,
        )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def thaw_json(value: Any) -> Any:
    """The inverse of ``freeze_json``: plain dicts and lists (e.g. to return from an API)."""
    return _plain(value)
