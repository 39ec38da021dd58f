"""Replication: quorum writes, failover reads and catch-up of a shard's replicas.

A collection with ``replication_factor`` R has R replicas (ShardActors) per shard. The
coordinator keeps one ``ReplicaSet`` per shard, in memory; the state of each replica is mirrored
(best effort) into the placement keys in etcd (``state``: ``ready`` / ``stale``).

Writes (``ReplicaSet.write``)
    A write (upsert batch or delete) is sent concurrently to every *ready* replica of the shard
    and acknowledged once ``required_acks(level, R)`` replicas applied it: ``one`` = 1,
    ``quorum`` = R // 2 + 1 (the default), ``all`` = R. If fewer replicas are ready than
    required the write is refused up front (nothing is sent). The replicas still answering
    after the acknowledgement finish in the background; any replica whose call fails (after
    the shard client's own retries over an actor restart) is marked **stale**: it missed a
    write. A write that got fewer acks than required fails with ``Unavailable`` (503) naming
    the shard; the replicas that did apply it keep it (writes are idempotent upserts/deletes
    by uuid, so the client may simply retry).

    Writes to one shard are serialised by the shard's ``write_lock``, held until *every*
    replica has answered (not only the quorum). So all replicas apply a shard's writes in the
    same order, and two writes to the same uuid cannot land in different orders on two
    replicas. Stale replicas receive no writes at all.

Reads (``ReplicaSet.read``)
    A read goes to one ready replica: replicas that did not fail recently first, round-robin
    among them. On ``Unavailable`` (actor dead or restarting) or a timeout it fails over to the
    next replica; when every replica failed with ``Unavailable`` it waits a short backoff (up
    to 2 s) and tries again while the deadline allows (so an RF=1 shard rides out its actor's
    restart).
    Each attempt gets an equal share of the remaining deadline. Errors such as ``NotFound`` or
    ``InvalidInput`` are answers, not failures, and are raised at once. Stale replicas never
    serve reads.

Catch-up (``sync_replica``, driven by ``Coordinator.repair_once``)
    A stale replica becomes ready again only after a full anti-entropy pass against a ready
    replica of the same shard (the *source*), run while holding the shard's write lock (writes
    to that shard wait for the pass; reads continue on the source):

    1. page through the stale replica (by uuid, with vectors) and keep a digest per object
       (sha1 of its canonical properties JSON and vector bytes);
    2. page through the source the same way; every object that is missing on the stale
       replica, or whose digest differs, is upserted to it (in pages);
    3. every uuid left over (present on the stale replica, absent on the source) was deleted
       while the replica was away: it is deleted on the stale replica. Deletes therefore
       propagate without tombstones: the source's *absence* of an object is authoritative
       because the source saw every acknowledged write (ready replicas miss none).

    Then the replica is marked ready (memory and etcd). If every replica of a shard is stale
    (all of them missed some write, e.g. with ``one``), the one that went stale last - it has
    every write the others have - is promoted to ready and becomes the source for the rest.

    A replica whose actor merely restarted (SIGKILL, Ray ``max_restarts``) without missing a
    write needs no catch-up: it recovers every write it acknowledged from its WAL, and the
    shard client re-sends the write that was in flight when it died.

A replica that Ray restarted without its data (``DataLost``: an empty data directory, e.g. on
another node) refuses reads and writes. Reads fail over and mark it stale when another replica
is ready; writes treat it like a replica out of storage. Its catch-up first tells it to serve
again (``clear_lost``), then refills it. With no other replica, reads and writes answer
``DataLost`` (503) at once, naming the node and directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from cluster.errors import (
    ColshardError,
    DataLost,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    StorageError,
    Unavailable,
)
from cluster.timing import READY_PROBE_TIMEOUT_S
from cluster.types import ObjectBatch, StoredObject, VectorColumn
from coordinator.fanout import ShardClient
from coordinator.routing import ReplicaEntry, ReplicaId, ReplicaState, Router

log = logging.getLogger(__name__)
T = TypeVar("T")

ConsistencyLevel = Literal["one", "quorum", "all"]
CONSISTENCY_LEVELS: tuple[str, ...] = ("one", "quorum", "all")
DEFAULT_CONSISTENCY: ConsistencyLevel = "quorum"
READY = ReplicaState.READY.value
STALE = ReplicaState.STALE.value
# A replica that failed a read within this window is tried after the others.
SUSPECT_S = 5.0
READ_RETRY_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)
SYNC_PAGE = 256
# Errors that reject the request itself: every replica answers the same, none missed a write.
REJECTIONS = (InvalidInput, NotFound, PayloadTooLarge)
# A replica that refused a write for lack of storage, or because it was restarted without its
# data (shard.actor), kept nothing of it: it missed the write only if another replica applied
# it.
REFUSALS = (StorageError, DataLost)
_BACKGROUND: set[asyncio.Future[Any]] = set()


def parse_consistency(value: str | None) -> ConsistencyLevel:
    if value is None or value == "":
        return DEFAULT_CONSISTENCY
    level = str(value).lower()
    if level not in CONSISTENCY_LEVELS:
        raise InvalidInput(
            f"consistency_level must be one of {list(CONSISTENCY_LEVELS)}",
            {"consistency_level": value},
        )
    return level  # type: ignore[return-value]


def required_acks(level: ConsistencyLevel, replication_factor: int) -> int:
    """Replicas that must apply a write before it is acknowledged."""
    if level == "one":
        return 1
    if level == "all":
        return replication_factor
    return replication_factor // 2 + 1


_SEQ = itertools.count()


def next_seq() -> int:
    """A write sequence number, increasing across coordinator restarts (wall clock based)."""
    return time.time_ns() + next(_SEQ)


class Replica:
    """One replica of a shard as replication sees it. Its routing truth (sync state, client,
    last applied write) is its entry in the ``Router``'s table (coordinator.routing), read and
    changed through it; what stays here is runtime: when it last failed a call."""

    def __init__(self, router: Router, entry: ReplicaEntry) -> None:
        self.index = entry.id.replica
        self.id = entry.id
        self._router = router
        self._last = entry  # until the router's table holds it
        self.last_failure = float("-inf")  # loop time of the last failed call
        self.failures = 0

    def entry(self) -> ReplicaEntry:
        """Its entry in the current table (the last one seen, once its collection is
        dropped)."""
        entry = self._router.table.replicas.get(self.id)
        if entry is not None:
            self._last = entry
        return self._last

    @property
    def state(self) -> str:
        return str(self.entry().sync)

    @state.setter
    def state(self, value: str) -> None:
        self._router.update(self.id, sync=ReplicaState(value))

    @property
    def client(self) -> ShardClient:
        return self.entry().client

    @client.setter
    def client(self, value: ShardClient) -> None:
        self._router.update(self.id, client=value)

    @property
    def last_ok_seq(self) -> int:
        return self._router.last_ok_seq(self.id)

    @last_ok_seq.setter
    def last_ok_seq(self, value: int) -> None:
        self._router.applied(self.id, value)


@dataclass
class WriteOutcome:
    """What one replicated write achieved: the first replica's answer and who applied it."""

    result: Any
    acked: tuple[int, ...]
    required: int


@dataclass
class ReplicaSet:
    """The replicas of one shard (see the module docstring)."""

    collection: str
    shard: int
    replicas: list[Replica]
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _rr: Iterator[int] = field(default_factory=itertools.count)

    @classmethod
    def over(cls, router: Router, entries: Sequence[ReplicaEntry]) -> ReplicaSet:
        """The replica set of one shard's ``entries`` (replica 0, 1, ...), whose truth is
        ``router``'s table once it holds them."""
        rid = entries[0].id
        return cls(rid.collection, rid.shard, [Replica(router, e) for e in entries])

    @classmethod
    def of(cls, collection: str, shard: int, clients: Sequence[ShardClient]) -> ReplicaSet:
        """Ready replicas over ``clients``, in a memory-only routing table of their own."""
        router = Router()
        entries = [ReplicaEntry(ReplicaId(collection, shard, i), c) for i, c in enumerate(clients)]
        router.put_entries(entries)
        return cls.over(router, entries)

    @property
    def name(self) -> str:
        return f"{self.collection}:{self.shard}"

    @property
    def rf(self) -> int:
        return len(self.replicas)

    def clients(self) -> list[ShardClient]:
        return [r.client for r in self.replicas]

    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == READY]

    def stale(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == STALE]

    def set_state(self, replica: Replica, state: str) -> None:
        if replica.state == state:
            return
        log.warning("replica %s:%d is now %s", self.name, replica.index, state)
        replica.state = state  # the router writes it to etcd

    def _details(self, **extra: Any) -> dict[str, Any]:
        return {"collection": self.collection, "shard": self.name, **extra}

    # ---- reads -----------------------------------------------------------------------------

    def read_order(self) -> list[Replica]:
        """Ready replicas: not recently failed first (round-robin among them), then the
        recently failed ones, least recently failed first."""
        now = time.monotonic()
        ready = self.ready()
        if not ready:
            return []
        start = next(self._rr) % len(ready)
        rotated = ready[start:] + ready[:start]
        healthy = [r for r in rotated if now - r.last_failure > SUSPECT_S]
        suspect = sorted(
            (r for r in rotated if now - r.last_failure <= SUSPECT_S), key=lambda r: r.last_failure
        )
        return healthy + suspect

    async def read(self, call: Callable[[ShardClient, float], Awaitable[T]], timeout_s: float) -> T:
        """``call(client, timeout_s)`` on one live replica, failing over (see module doc)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        errors: dict[int, ColshardError] = {}
        timed_out = False
        for attempt in itertools.count():
            order = self.read_order()
            if not order:
                raise Unavailable(
                    f"shard {self.name} has no ready replica (all stale)",
                    self._details(replicas={r.index: r.state for r in self.replicas}),
                )
            for pos, replica in enumerate(order):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    timed_out = True
                    break
                share = remaining / (len(order) - pos)
                try:
                    return await call(replica.client, max(0.001, share))
                except DataLost as exc:
                    # Restarted without its data: the others serve; a catch-up refills it.
                    errors[replica.index] = exc
                    if any(r is not replica for r in self.ready()):
                        log.warning(
                            "%s; marking replica %s:%d stale", exc.message, self.name, replica.index
                        )
                        self.set_state(replica, STALE)
                except (Unavailable, DeadlineExceeded) as exc:
                    replica.last_failure = time.monotonic()
                    replica.failures += 1
                    errors[replica.index] = exc
                    timed_out = timed_out or isinstance(exc, DeadlineExceeded)
                    log.info(
                        "read from %s:%d failed (%s); failing over",
                        self.name,
                        replica.index,
                        exc.message,
                    )
            if timed_out:
                break
            lost = [e for e in errors.values() if isinstance(e, DataLost)]
            if lost and len(lost) == len(errors):  # waiting does not bring the data back
                raise lost[0]
            pause = READ_RETRY_BACKOFF_S[min(attempt, len(READ_RETRY_BACKOFF_S) - 1)]
            if loop.time() + pause >= deadline:
                break
            await asyncio.sleep(pause)
        details = self._details(replicas={i: e.message for i, e in sorted(errors.items())})
        if timed_out or (errors and all(isinstance(e, DeadlineExceeded) for e in errors.values())):
            raise DeadlineExceeded(
                f"shard {self.name} did not answer in time ({timeout_s:g} s)", details
            )
        raise Unavailable(f"shard {self.name} is unavailable: no replica answered", details)

    # ---- writes ----------------------------------------------------------------------------

    async def write(
        self,
        call: Callable[[ShardClient, float], Awaitable[T]],
        level: ConsistencyLevel,
        timeout_s: float,
    ) -> WriteOutcome:
        """``call(client, timeout_s)`` on every ready replica; see the module docstring.
        Raises Unavailable naming the shard when fewer than the required replicas applied
        it."""
        required = required_acks(level, self.rf)
        await self.write_lock.acquire()
        released = False
        try:
            targets = self.ready()
            if len(targets) < required:
                raise Unavailable(
                    f"shard {self.name}: write needs {required} replica(s) "
                    f"(consistency {level}) but only {len(targets)} of {self.rf} are ready",
                    self._details(
                        required=required,
                        ready=len(targets),
                        replication_factor=self.rf,
                        consistency_level=level,
                    ),
                )
            seq = next_seq()
            tasks: dict[asyncio.Future[Any], Replica] = {
                asyncio.ensure_future(call(r.client, timeout_s)): r for r in targets
            }
            pending: set[asyncio.Future[Any]] = set(tasks)
            acked: list[Replica] = []
            first: Any = None
            try:
                while pending and len(acked) < required:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if self._settle(task, tasks[task], seq, defer_refusal=True):
                            if not acked:
                                first = task.result()
                            acked.append(tasks[task])
                    if len(acked) + len(pending) < required:
                        break
            except BaseException:  # cancelled: the replica calls still finish under the lock
                pending = {t for t in tasks if not t.done()}
                if pending:
                    released = True
                    self._spawn_finish(pending, tasks, seq)
                raise
            if pending:
                # Acknowledge now; the stragglers finish in the background, holding the lock.
                released = True
                self._spawn_finish(pending, tasks, seq)
            refused = [
                t
                for t in tasks
                if t.done() and not t.cancelled() and isinstance(t.exception(), REFUSALS)
            ]
            if acked:  # applied elsewhere: the replicas that refused it missed it
                for task in refused:
                    self._settle(task, tasks[task], seq)
            if len(acked) < required:
                rejected = [
                    t.exception()
                    for t in tasks
                    if t.done() and not t.cancelled() and isinstance(t.exception(), REJECTIONS)
                ]
                if rejected and not acked:
                    raise rejected[0]  # type: ignore[misc]
                if refused and not acked:  # e.g. disk full: 507, nothing written anywhere
                    raise refused[0].exception()  # type: ignore[misc]
                failed = {r.index: r.state for r in targets if r not in acked}
                raise Unavailable(
                    f"shard {self.name}: write reached {len(acked)} of the {required} "
                    f"replica(s) required (consistency {level})",
                    self._details(
                        acked=len(acked),
                        required=required,
                        replication_factor=self.rf,
                        consistency_level=level,
                        failed_replicas=failed,
                    ),
                )
            return WriteOutcome(first, tuple(r.index for r in acked), required)
        finally:
            if not released:
                self.write_lock.release()

    def _settle(
        self, task: asyncio.Future[Any], replica: Replica, seq: int, *, defer_refusal: bool = False
    ) -> bool:
        """Record one replica's outcome; True if it applied the write. A replica that failed
        for any reason but a rejection of the request itself (which every replica would
        reject alike) missed the write and is marked stale."""
        exc: BaseException | None = (
            asyncio.CancelledError() if task.cancelled() else task.exception()
        )
        if exc is None:
            replica.last_ok_seq = seq
            return True
        if isinstance(exc, REJECTIONS) or (defer_refusal and isinstance(exc, REFUSALS)):
            return False
        log.warning("write to %s:%d failed: %r; marking it stale", self.name, replica.index, exc)
        self.set_state(replica, STALE)
        return False

    def _spawn_finish(
        self, pending: set[asyncio.Future[Any]], tasks: dict[asyncio.Future[Any], Replica], seq: int
    ) -> None:
        finisher = asyncio.ensure_future(self._finish(pending, tasks, seq))
        _BACKGROUND.add(finisher)
        finisher.add_done_callback(_BACKGROUND.discard)

    async def _finish(
        self, pending: set[asyncio.Future[Any]], tasks: dict[asyncio.Future[Any], Replica], seq: int
    ) -> None:
        try:
            done, _ = await asyncio.wait(pending)
            for task in done:
                self._settle(task, tasks[task], seq)
        except Exception:
            log.exception("finishing a write to %s failed", self.name)
        finally:
            self.write_lock.release()

    # ---- catch-up --------------------------------------------------------------------------

    def promote_if_all_stale(self) -> Replica | None:
        """With no ready replica, the one that applied the latest write becomes ready."""
        if self.ready() or not self.replicas:
            return None
        best = max(self.replicas, key=lambda r: r.last_ok_seq)
        self.set_state(best, READY)
        return best

    async def catch_up(self, replica: Replica, timeout_s: float) -> dict[str, int] | None:
        """Bring one stale replica up to date from a ready one; None when it cannot be done
        now (no ready source, or the replica does not answer). Marks it ready on success."""
        if replica.state != STALE:
            return None
        try:
            await replica.client.ready(min(timeout_s, READY_PROBE_TIMEOUT_S))
        except ColshardError:
            return None  # still down; try again on the next round
        async with self.write_lock:
            if replica.state != STALE:
                return None
            sources = [r for r in self.read_order() if r is not replica]
            if not sources:
                return None
            source = sources[0]
            # A replica restarted without its data refuses everything until told that this
            # full copy refills it; it stays stale (no reads, no writes) until the copy is done.
            lost = await replica.client.clear_lost(timeout_s)
            if lost:
                log.warning(
                    "replica %s:%d lost its data (%s); refilling it from replica %d",
                    self.name,
                    replica.index,
                    lost,
                    source.index,
                )
            stats = await sync_replica(source.client, replica.client, timeout_s)
            replica.last_ok_seq = source.last_ok_seq
            self.set_state(replica, READY)
        log.warning(
            "replica %s:%d caught up from replica %d: %s",
            self.name,
            replica.index,
            source.index,
            stats,
        )
        return stats


@dataclass(frozen=True)
class Digest:
    """What catch-up compares of one object: its properties and, per named vector, its shape
    and values. A vector decoded from a lossy codec without kept originals (``obj.lossy``)
    carries no value hash: its values differ between replicas that sealed it in different
    segments, so two replicas agree on it when its shape matches (re-copying it would only
    re-quantise it on the target)."""

    properties: bytes
    vectors: tuple[tuple[str, str, bytes | None], ...]

    def same(self, other: Digest | None) -> bool:
        if other is None or other.properties != self.properties:
            return False
        if [(n, s) for n, s, _ in self.vectors] != [(n, s) for n, s, _ in other.vectors]:
            return False
        return all(
            a is None or b is None or a == b
            for (_, _, a), (_, _, b) in zip(self.vectors, other.vectors, strict=True)
        )


def object_digest(obj: StoredObject) -> Digest:
    props = hashlib.sha1(json.dumps(dict(obj.properties), sort_keys=True, default=str).encode())
    vectors = []
    for name in sorted(obj.vectors or {}):
        matrix = np.ascontiguousarray((obj.vectors or {})[name], dtype=np.float32)
        values = None if name in obj.lossy else hashlib.sha1(matrix.tobytes()).digest()
        vectors.append((name, str(matrix.shape), values))
    return Digest(props.digest(), tuple(vectors))


def batch_of(objects: Sequence[StoredObject]) -> ObjectBatch:
    """Stored objects (with vectors) back into an upsert batch, byte for byte."""
    names = sorted({n for o in objects for n in (o.vectors or {})})
    columns: dict[str, VectorColumn] = {}
    for name in names:
        mats = [
            None
            if o.vectors is None or name not in o.vectors
            else np.ascontiguousarray(o.vectors[name], dtype=np.float32)
            for o in objects
        ]
        dim = next(m.shape[1] for m in mats if m is not None)
        columns[name] = VectorColumn.from_matrices(mats, dim)
    return ObjectBatch(
        tuple(o.uuid for o in objects), tuple(dict(o.properties) for o in objects), columns
    )


async def _pages(
    client: ShardClient, timeout_s: float, page: int
) -> AsyncIterator[list[StoredObject]]:
    after: str | None = None
    while True:
        objs = await client.list_objects(after, page, True, timeout_s)
        if objs:
            yield objs
        if len(objs) < page:
            return
        after = objs[-1].uuid


async def sync_replica(
    source: ShardClient, target: ShardClient, timeout_s: float, page: int = SYNC_PAGE
) -> dict[str, int]:
    """Make ``target`` hold exactly ``source``'s objects (anti-entropy by per-object digest).
    Returns counts: compared, copied, deleted."""
    have: dict[str, Digest] = {}
    async for objs in _pages(target, timeout_s, page):
        for o in objs:
            have[o.uuid] = object_digest(o)
    compared = copied = 0
    async for objs in _pages(source, timeout_s, page):
        compared += len(objs)
        todo = [o for o in objs if not object_digest(o).same(have.pop(o.uuid, None))]
        if todo:
            results = await target.upsert(batch_of(todo), timeout_s)
            bad = [r for r in results if not r.ok]
            if bad:
                raise Unavailable(
                    f"catch-up upsert failed for {len(bad)} object(s)",
                    {"error": dict(bad[0].error or {})},
                )
            copied += len(todo)
    extra = sorted(have)
    for i in range(0, len(extra), page):
        await target.delete(extra[i : i + page], timeout_s)
    return {"compared": compared, "copied": copied, "deleted": len(extra)}
