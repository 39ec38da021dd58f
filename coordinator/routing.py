"""Routing truth: one immutable, versioned ``RoutingTable`` and the one ``Router`` that writes it.

A ``RoutingTable`` is a snapshot of everything the coordinator routes by: the collection specs,
and per replica (``ReplicaId``) one ``ReplicaEntry`` with its client, where it runs, whether it
has every acknowledged write (``sync``: ready / stale) and, while its node is gone, its
``outage``. A reader takes ``router.table`` once and reads that one snapshot: the query path,
``/v1/cluster`` and ``/readyz`` never mix two versions.

The ``Router`` is the only writer. Replication (replica went stale / caught up), membership
(node gone / back) and schema changes (collection created / dropped) each call one of its
methods; each change makes a new snapshot (``version`` + 1). The Router is also the only code
that writes placement records to etcd: a changed record is marked dirty and written in the
background (``flush``), so an etcd outage never holds up a write; records still pending are
written once etcd answers (the coordinator's repair loop calls ``flush`` every second).

There is one coordinator per cluster (a named Ray actor), so it is the only writer of
placements and needs no etcd watch; a snapshot's ``version`` counts this coordinator's
changes since it started.

Runtime state that is not routing truth stays with the mechanism that uses it: write locks,
read round-robin and recent failures in ``coordinator.replication.ReplicaSet``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from cluster.errors import ColshardError, NotFound
from cluster.spec import CollectionSpec
from cluster.timing import PLACEMENT_TIMEOUT_S
from coordinator.fanout import ShardClient

if TYPE_CHECKING:
    from coordinator.replication import ReplicaSet

log = logging.getLogger(__name__)

_TASKS: set[asyncio.Future[Any]] = set()


class ReplicaState(StrEnum):
    READY = "ready"  # has every acknowledged write; serves reads and takes writes
    STALE = "stale"  # missed a write; neither serves nor takes writes until caught up
    UNAVAILABLE = "unavailable"  # its node is not a member (membership); shown and stored
    DATA_LOST = "data_lost"  # answers without its data; shown, never stored


@dataclass(frozen=True, order=True)
class ReplicaId:
    collection: str
    shard: int
    replica: int

    def __str__(self) -> str:
        return f"{self.collection}:{self.shard}:{self.replica}"

    @property
    def shard_name(self) -> str:
        return f"{self.collection}:{self.shard}"


@dataclass(frozen=True)
class Outage:
    """The replica's node is not a member and it answers from no member node."""

    node_id: str
    since: float


@dataclass(frozen=True)
class ReplicaEntry:
    id: ReplicaId
    client: ShardClient
    sync: ReplicaState = ReplicaState.READY  # READY or STALE
    actor: str = ""
    node_id: str = ""
    host: str = ""
    pid: int = 0
    outage: Outage | None = None
    shard_host: str = ""  # the shard host actor holding it (shard.host), as Ray names it

    @property
    def state(self) -> ReplicaState:
        """What it is shown as: unavailable during an outage, else its sync state."""
        return ReplicaState.UNAVAILABLE if self.outage is not None else self.sync

    def record(self, last_ok_seq: int) -> dict[str, Any]:
        """Its placement record in etcd (``cluster.etcd_store`` ``placements/...``), with the
        sequence of the last write it applied (``Router.last_ok_seq``)."""
        out: dict[str, Any] = {
            "actor": self.actor,
            "node_id": self.node_id,
            "host": self.host,
            "pid": self.pid,
            "shard_host": self.shard_host,
            "state": str(self.state),
            "last_ok_seq": last_ok_seq,
        }
        if self.outage is not None:
            out.update(
                previous_state=str(self.sync),
                unavailable_since=self.outage.since,
                reason=f"node {self.outage.node_id} is not a member",
            )
        return out


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class RoutingTable:
    version: int = 0
    specs: Mapping[str, CollectionSpec] = field(default_factory=lambda: _frozen({}))
    replicas: Mapping[ReplicaId, ReplicaEntry] = field(default_factory=lambda: _frozen({}))
    # collection -> shard -> its ReplicaSet (the runtime around the entries)
    sets: Mapping[str, tuple[ReplicaSet, ...]] = field(default_factory=lambda: _frozen({}))

    def spec(self, name: str) -> CollectionSpec | None:
        return self.specs.get(name)

    def entries(self, collection: str | None = None) -> Iterator[ReplicaEntry]:
        """Every replica (of ``collection``), in (collection, shard, replica) order."""
        for rid in sorted(self.replicas):
            if collection is None or rid.collection == collection:
                yield self.replicas[rid]

    def shard_sets(self, collection: str) -> tuple[ReplicaSet, ...]:
        return self.sets.get(collection, ())

    def unavailable_shards(self) -> list[str]:
        """``collection:shard`` of every shard none of whose replicas is available."""
        shards: dict[str, list[bool]] = {}
        for entry in self.entries():
            shards.setdefault(entry.id.shard_name, []).append(entry.outage is not None)
        return sorted(name for name, down in shards.items() if down and all(down))


class PlacementStore(Protocol):
    async def put_placement(
        self, collection: str, shard: int, replica: int, info: Mapping[str, Any]
    ) -> None: ...


class Router:
    """The one writer of the routing table and of placement records (see the module doc).
    With ``store`` None it keeps the table in memory only (a ``ReplicaSet`` on its own)."""

    def __init__(
        self, store: PlacementStore | None = None, write_timeout_s: float = PLACEMENT_TIMEOUT_S
    ) -> None:
        self._store = store
        self._write_timeout_s = write_timeout_s
        self._table = RoutingTable()
        self._dirty: set[ReplicaId] = set()
        self._flush_lock = asyncio.Lock()
        # Per replica, the sequence of the last write it applied: replication progress, changed
        # by every write, so kept beside the table (no new snapshot per write) and written with
        # the replica's next placement record.
        self._seqs: dict[ReplicaId, int] = {}

    @property
    def table(self) -> RoutingTable:
        return self._table

    @property
    def pending(self) -> frozenset[ReplicaId]:
        """Placement records changed since etcd last took them."""
        return frozenset(self._dirty)

    def _commit(
        self,
        *,
        specs: Mapping[str, CollectionSpec] | None = None,
        replicas: Mapping[ReplicaId, ReplicaEntry] | None = None,
        sets: Mapping[str, tuple[ReplicaSet, ...]] | None = None,
    ) -> RoutingTable:
        t = self._table
        self._table = RoutingTable(
            t.version + 1,
            _frozen(specs) if specs is not None else t.specs,
            _frozen(replicas) if replicas is not None else t.replicas,
            _frozen(sets) if sets is not None else t.sets,
        )
        return self._table

    # ---- schema ------------------------------------------------------------------------------

    def add_collection(
        self,
        spec: CollectionSpec,
        entries: Sequence[ReplicaEntry],
        sets: Sequence[ReplicaSet],
        last_ok_seqs: Mapping[ReplicaId, int] | None = None,
    ) -> None:
        """A collection is served: its spec, every replica's entry (and the last write each
        applied, as recorded before) and the shards' sets. Its records are marked to write
        (``flush``)."""
        replicas = {k: v for k, v in self._table.replicas.items() if k.collection != spec.name}
        replicas.update((e.id, e) for e in entries)
        self._commit(
            specs={**self._table.specs, spec.name: spec},
            replicas=replicas,
            sets={**self._table.sets, spec.name: tuple(sets)},
        )
        self._seqs.update(last_ok_seqs or {})
        self._dirty.update(e.id for e in entries)

    def put_entries(self, entries: Iterable[ReplicaEntry]) -> None:
        """Add (or replace) replica entries, written to etcd by the next ``flush``."""
        entries = list(entries)
        self._commit(replicas={**self._table.replicas, **{e.id: e for e in entries}})
        self._dirty.update(e.id for e in entries)

    def drop_collection(self, name: str) -> None:
        self._commit(
            specs={k: v for k, v in self._table.specs.items() if k != name},
            replicas={k: v for k, v in self._table.replicas.items() if k.collection != name},
            sets={k: v for k, v in self._table.sets.items() if k != name},
        )
        self._dirty = {k for k in self._dirty if k.collection != name}
        self._seqs = {k: v for k, v in self._seqs.items() if k.collection != name}

    # ---- replicas ----------------------------------------------------------------------------

    def last_ok_seq(self, rid: ReplicaId) -> int:
        return self._seqs.get(rid, 0)

    def applied(self, rid: ReplicaId, seq: int) -> None:
        """Replica ``rid`` applied the write with sequence ``seq`` (no new snapshot, nothing
        written now: its next placement record carries it)."""
        self._seqs[rid] = seq

    def record(self, entry: ReplicaEntry) -> dict[str, Any]:
        """``entry``'s placement record, with its last applied write."""
        return entry.record(self.last_ok_seq(entry.id))

    def update(self, rid: ReplicaId, **changes: Any) -> bool:
        """Change one replica's entry (``ReplicaEntry`` fields); True if anything changed. A
        change to its placement record is written to etcd in the background. Unknown replicas
        (the collection was dropped meanwhile) are ignored."""
        entry = self._table.replicas.get(rid)
        if entry is None:
            return False
        new = dataclasses.replace(entry, **changes)
        if new == entry:
            return False
        self._commit(replicas={**self._table.replicas, rid: new})
        if new.record(0) != entry.record(0):
            self._dirty.add(rid)
            self._flush_soon()
        return True

    def _flush_soon(self) -> None:
        if self._store is None:
            self._dirty.clear()
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next flush writes it
        task = asyncio.ensure_future(self.flush())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    async def flush(self, *, raise_errors: bool = False) -> int:
        """Write every changed placement record to etcd; returns how many are still pending
        (etcd unreachable: they are written by a later flush). With ``raise_errors`` the
        first failure is raised (creating a collection fails when etcd does not take its
        placements)."""
        if self._store is None:
            self._dirty.clear()
            return 0
        async with self._flush_lock:
            for rid in sorted(self._dirty):
                entry = self._table.replicas.get(rid)
                if entry is None:
                    self._dirty.discard(rid)
                    continue
                try:
                    await asyncio.wait_for(
                        self._store.put_placement(
                            rid.collection, rid.shard, rid.replica, self.record(entry)
                        ),
                        self._write_timeout_s,
                    )
                except NotFound:  # the collection was dropped meanwhile
                    self._dirty.discard(rid)
                    continue
                except (ColshardError, TimeoutError) as exc:
                    if raise_errors:
                        raise
                    log.info("placement of %s not written yet: %s", rid, exc)
                    break
                if self._table.replicas.get(rid) == entry:
                    self._dirty.discard(rid)  # else it changed meanwhile: written next round
            return len(self._dirty)


def outage_started(router: Router, rid: ReplicaId) -> bool:
    """Mark ``rid`` unavailable (its node left), once; True if it was not already."""
    entry = router.table.replicas.get(rid)
    if entry is None or entry.outage is not None:
        return False
    return router.update(rid, outage=Outage(entry.node_id, time.time()))


def outage_ended(router: Router, rid: ReplicaId, where: Mapping[str, Any]) -> bool:
    """``rid`` answers from member node ``where["node_id"]``: available there again."""
    return router.update(
        rid,
        outage=None,
        node_id=str(where["node_id"]),
        host=str(where.get("host", "")),
        pid=int(where.get("pid", 0) or 0),
        shard_host=str(where.get("shard_host", "")),
    )


def placements_view(table: RoutingTable, last_ok_seq: Callable[[ReplicaId], int]) -> dict[str, Any]:
    """``/v1/cluster``'s ``collections`` from one snapshot: per collection its shape and every
    replica's placement record (with ``last_ok_seq(replica)``)."""
    out: dict[str, Any] = {}
    for name in sorted(table.specs):
        spec = table.specs[name]
        out[name] = {
            "shard_count": spec.shard_count,
            "replication_factor": spec.replication_factor,
            "placements": [
                {"shard": e.id.shard, "replica": e.id.replica, **e.record(last_ok_seq(e.id))}
                for e in table.entries(name)
            ],
        }
    return out
