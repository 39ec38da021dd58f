"""``EtcdStore``: colshard's cluster state in etcd. The only module that imports ``aetcd``.

Keys live under ``/colshard/<cluster_name>/`` (see ``cluster.snapshot.KeyLayout``). Every etcd
call goes through ``EtcdStore._call``: one deadline (``timeout_s``) per call, and every
aetcd/gRPC exception is turned into a colshard error by ``_map_error``, raised ``from exc``:

    refused / reset / closed channel, UNAVAILABLE, DEADLINE_EXCEEDED, timeouts -> Unavailable
    UNAUTHENTICATED, PERMISSION_DENIED (etcd unusable with our credentials)    -> Unavailable
    NOT_FOUND (e.g. an expired lease)                                          -> NotFound
    INVALID_ARGUMENT                                                           -> InvalidInput
    anything else                                                              -> InternalError

After an ``Unavailable`` the gRPC channel is dropped; the next call dials again, trying the
endpoints in turn starting after the one that failed.

Background tasks (they stop on ``close()``):

- ``MemberLease`` keeps a lease alive (refresh every ttl/3, retried quickly while etcd is
  unreachable). A member lease that etcd expired is re-granted and its key re-written once etcd
  answers again.

There is no watch: the one coordinator is the only writer of schema and placements
(``coordinator.routing``), so nothing needs to learn of changes from etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions as etcd_errors
import aetcd.rpc

from cluster.errors import (
    AlreadyExists,
    ColshardError,
    InternalError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from cluster.snapshot import ClusterSnapshot, KeyLayout, thaw_json, validate_node_id
from cluster.spec import CollectionSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

# gRPC channel tuning: notice a dead connection (keepalive pings while a stream is open; etcd's
# default --grpc-keepalive-min-time is 5 s) and reconnect quickly once etcd is back, instead of
# gRPC's default backoff of up to two minutes. A channel of its own per client: with gRPC's
# global subchannel pool a freshly dialled client would inherit the old connection's backoff and
# fail with its stale "connection refused" although etcd is back.
CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}
MAX_HOLDER_LEN = 256
# Deadlines use ``asyncio.timeout``, not ``asyncio.wait_for``: on Python 3.11 ``wait_for`` can
# swallow a cancellation that races with its result, which left a cancelled watch running.


def _map_error(exc: BaseException, op: str, endpoint: str) -> ColshardError:
    """The one place where etcd client errors become colshard errors."""
    if isinstance(exc, ColshardError):
        return exc
    details: dict[str, Any] = {"op": op, "endpoint": endpoint}
    rpc_error = exc if isinstance(exc, aetcd.rpc.AioRpcError) else exc.__cause__
    code = rpc_error.code() if isinstance(rpc_error, aetcd.rpc.AioRpcError) else None
    if code is not None:
        details["grpc_code"] = code.name
    sc = aetcd.rpc.StatusCode
    timed_out = (TimeoutError, etcd_errors.ConnectionTimeoutError, etcd_errors.WatchTimeoutError)
    if isinstance(exc, timed_out) or code == sc.DEADLINE_EXCEEDED:
        return Unavailable(f"etcd at {endpoint} did not answer {op} in time", details)
    # CancelledError here is gRPC's "channel closed under this call", not a task cancellation.
    unreachable = (etcd_errors.ConnectionFailedError, OSError, asyncio.CancelledError)
    if isinstance(exc, unreachable) or code in (sc.UNAVAILABLE, sc.CANCELLED):
        return Unavailable(f"etcd at {endpoint} unreachable during {op}: {exc}", details)
    if isinstance(exc, etcd_errors.UnauthenticatedError) or code in (
        sc.UNAUTHENTICATED,
        sc.PERMISSION_DENIED,
    ):
        return Unavailable(f"etcd at {endpoint} refused {op}: {exc}", details)
    if code == sc.NOT_FOUND:
        return NotFound(f"etcd {op}: {exc}", details)
    if isinstance(exc, etcd_errors.InvalidArgumentError) or code == sc.INVALID_ARGUMENT:
        return InvalidInput(f"etcd rejected {op}: {exc}", details)
    if isinstance(exc, etcd_errors.RevisionCompactedError):
        details["compacted_revision"] = exc.compacted_revision
    return InternalError(f"etcd {op} failed: {type(exc).__name__}: {exc}", details)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """ "host:port" (an http:// prefix and [ipv6] brackets are accepted) -> (host, port)."""
    text = endpoint.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    host, sep, port = text.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(
            f"invalid etcd endpoint {endpoint!r}: expected host:port", {"endpoint": endpoint}
        )
    return host, int(port)


def _prefix_range_end(prefix: bytes) -> bytes:
    # Our prefixes end with "/", so bumping the last byte is always possible.
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _json_bytes(what: str, info: Mapping[str, Any]) -> bytes:
    if not isinstance(info, Mapping):
        raise InvalidInput(f"{what} must be a mapping")
    try:
        return json.dumps(dict(info), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}") from exc


def _cancel_requested() -> bool:
    """Whether the running task itself is being cancelled. gRPC also raises CancelledError when
    a call dies because its channel was closed (e.g. another task dropped the client); that one
    is a connection failure, not a request to stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _loop_deadline(monotonic_deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the event loop's clock."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


async def _cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has finished. Unlike ``suppress(CancelledError)``
    around ``await task``, this never swallows a cancellation aimed at the caller."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    await asyncio.wait({task})


def _check_ttl(ttl_s: int) -> int:
    if not isinstance(ttl_s, int) or isinstance(ttl_s, bool) or ttl_s < 1:
        raise InvalidInput("ttl_s must be a positive integer (seconds)", {"ttl_s": ttl_s})
    return ttl_s


class EtcdStore:
    """Async access to one colshard cluster's state. Build with ``await EtcdStore.connect(...)``;
    use from one event loop; ``await close()`` when done."""

    def __init__(self, endpoints: Sequence[str], cluster_name: str, timeout_s: float) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise InvalidInput("at least one etcd endpoint is needed")
        if not timeout_s > 0:
            raise InvalidInput("timeout_s must be positive", {"timeout_s": timeout_s})
        self._endpoints = tuple(parse_endpoint(e) for e in endpoints)
        self.layout = KeyLayout(cluster_name)
        self.timeout_s = float(timeout_s)
        self._client: Any = None  # aetcd.Client
        self._index = 0  # endpoint of the current (or next) client
        self._dial_lock = asyncio.Lock()
        self._closed = False
        self._leases: set[MemberLease] = set()

    # ---- connection --------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, endpoints: Sequence[str], cluster_name: str, timeout_s: float
    ) -> EtcdStore:
        """Dial the endpoints in order; Unavailable if none answers a read within timeout_s."""
        store = cls(endpoints, cluster_name, timeout_s)
        await store._ensure_client(time.monotonic() + store.timeout_s)
        return store

    @property
    def cluster_name(self) -> str:
        return self.layout.cluster_name

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(f"{h}:{p}" for h, p in self._endpoints)

    @property
    def endpoint(self) -> str:
        """The endpoint in use (or to be tried next)."""
        host, port = self._endpoints[self._index]
        return f"{host}:{port}"

    async def _ensure_client(self, deadline: float) -> Any:
        if self._closed:
            raise Unavailable("etcd store is closed", {"cluster": self.cluster_name})
        if self._client is not None:
            return self._client
        async with self._dial_lock:
            if self._client is None:
                self._client = await self._dial(deadline)
            return self._client

    async def _dial(self, deadline: float) -> Any:
        n = len(self._endpoints)
        failures: dict[str, str] = {}
        for attempt in range(n):
            idx = (self._index + attempt) % n
            host, port = self._endpoints[idx]
            endpoint = f"{host}:{port}"
            # Share what is left of the deadline among the endpoints not tried yet.
            budget = (deadline - time.monotonic()) / (n - attempt)
            if budget <= 0:
                failures[endpoint] = "no time left"
                continue
            # Per-RPC gRPC deadline: timeout_s; every call is also cut by its own asyncio timeout.
            client = aetcd.Client(host, port, timeout=self.timeout_s, options=CHANNEL_OPTIONS)
            try:
                # A linearizable read proves more than a TCP connect: etcd has a leader.
                async with asyncio.timeout(budget):
                    await client.get(self.layout.leader.encode())
            except (Exception, asyncio.CancelledError) as exc:
                await self._close_client(client)
                if isinstance(exc, asyncio.CancelledError) and _cancel_requested():
                    raise
                failures[endpoint] = str(_map_error(exc, "connect", endpoint))
                continue
            self._index = idx
            return client
        raise Unavailable(
            f"no etcd endpoint reachable: {failures}",
            {"endpoints": list(self.endpoints), "errors": failures},
        )

    async def _drop_client(self, client: Any) -> None:
        """Forget a client that failed; the next call dials again from the next endpoint."""
        if client is None or self._client is not client:
            return
        self._client = None
        self._index = (self._index + 1) % len(self._endpoints)
        await self._close_client(client)

    async def _close_client(self, client: Any) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.close()
        except (Exception, asyncio.CancelledError):
            if _cancel_requested():
                raise

    async def _call(
        self, op: str, fn: Callable[[Any], Awaitable[T]], timeout_s: float | None = None
    ) -> T:
        """Run ``fn(client)`` under one deadline (``timeout_s``, default the store's); map every
        client error (see ``_map_error``)."""
        deadline = time.monotonic() + min(self.timeout_s, timeout_s or self.timeout_s)
        client = await self._ensure_client(deadline)
        endpoint = self.endpoint
        try:
            async with asyncio.timeout_at(_loop_deadline(deadline)):
                return await fn(client)
        except ColshardError:
            raise
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancel_requested():
                raise
            err = _map_error(exc, op, endpoint)
            if isinstance(err, Unavailable):
                await self._drop_client(client)
            raise err from exc

    async def ping(self) -> bool:
        """True if etcd answers a linearizable read within timeout_s."""
        try:
            await self._call("ping", lambda c: c.get(self.layout.leader.encode()))
        except ColshardError:
            return False
        return True

    async def close(self) -> None:
        """Stop lease keep-alives (revoking the leases, best effort), close."""
        if self._closed:
            return
        reachable = True
        for lease in list(self._leases):
            if not reachable:
                await lease.stop_refreshing()  # etcd is gone: let the rest expire
                continue
            try:
                await lease.revoke()
            except ColshardError:
                reachable = False
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- collections -------------------------------------------------------------------------

    async def create_collection(self, spec: CollectionSpec) -> int:
        """Store the spec if no collection of that name exists (one transaction).
        Returns the etcd revision of the creation; AlreadyExists otherwise."""
        key = self.layout.collection(spec.name).encode()
        value = spec.to_json().encode()

        async def txn(c: Any) -> Any:
            return await c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, value), c.transactions.get(key)],
                failure=[],
            )

        succeeded, responses = await self._call("create_collection", txn)
        if not succeeded:
            raise AlreadyExists(
                f"collection {spec.name!r} already exists", {"collection": spec.name}
            )
        return int(responses[1][0][1].create_revision)

    async def get_collection(self, name: str) -> CollectionSpec | None:
        key = self.layout.collection(name)
        got = await self._call("get_collection", lambda c: c.get(key.encode()))
        if got is None:
            return None
        try:
            return CollectionSpec.from_json(got.value)
        except (InvalidInput, ValueError) as exc:
            raise InternalError(
                f"stored spec of collection {name!r} is invalid: {exc}",
                {"collection": name, "key": key},
            ) from exc

    async def list_collections(self) -> dict[str, CollectionSpec]:
        """All valid collection specs (an invalid stored spec is logged and skipped)."""
        items, revision = await self._get_prefix("list_collections", self.layout.collections_prefix)
        return dict(ClusterSnapshot.from_items(self.layout, revision, items).collections)

    async def delete_collection(self, name: str) -> bool:
        """Delete the spec and every placement key of the collection in one transaction.
        False if there was no such collection (stray placement keys are removed anyway)."""
        key = self.layout.collection(name).encode()
        prefix = self.layout.placement_prefix(name).encode()

        async def txn(c: Any) -> Any:
            drop_placements = c.transactions.delete(prefix, range_end=_prefix_range_end(prefix))
            return await c.transaction(
                compare=[c.transactions.version(key) > 0],
                success=[c.transactions.delete(key), drop_placements],
                failure=[drop_placements],
            )

        succeeded, _ = await self._call("delete_collection", txn)
        return bool(succeeded)

    # ---- placement ---------------------------------------------------------------------------

    async def put_placement(
        self, collection: str, shard: int, replica: int, info: Mapping[str, Any]
    ) -> None:
        """Record where one replica of a shard lives (actor name, node id, state, data dir).
        NotFound if the collection does not exist (checked in the same transaction)."""
        key = self.layout.placement(collection, shard, replica).encode()
        spec_key = self.layout.collection(collection).encode()
        value = _json_bytes("placement info", info)

        async def txn(c: Any) -> Any:
            return await c.transaction(
                compare=[c.transactions.version(spec_key) > 0],
                success=[c.transactions.put(key, value)],
                failure=[],
            )

        succeeded, _ = await self._call("put_placement", txn)
        if not succeeded:
            raise NotFound(f"collection {collection!r} does not exist", {"collection": collection})

    async def get_placements(self, collection: str) -> dict[tuple[int, int], dict[str, Any]]:
        """(shard, replica) -> placement info, as plain dicts."""
        items, revision = await self._get_prefix(
            "get_placements", self.layout.placement_prefix(collection)
        )
        snap = ClusterSnapshot.from_items(self.layout, revision, items)
        reps = snap.placements.get(collection, {})
        return {sr: thaw_json(info) for sr, info in reps.items()}

    # ---- membership -----------------------------------------------------------------------

    async def register_member(
        self, node_id: str, info: Mapping[str, Any], ttl_s: int
    ) -> MemberLease:
        """Write ``members/<node_id>`` bound to a fresh lease and keep the lease alive in the
        background. The key disappears ``ttl_s`` after the node stops refreshing (it died)."""
        key = self.layout.member(validate_node_id(node_id))
        value = _json_bytes("member info", info)
        _check_ttl(ttl_s)
        started = time.monotonic()
        lease_id = await self._grant_and_put(key, value, ttl_s)
        return self._start_lease(key, value, ttl_s, lease_id, started)

    async def list_members(self) -> dict[str, dict[str, Any]]:
        items, revision = await self._get_prefix("list_members", self.layout.members_prefix)
        snap = ClusterSnapshot.from_items(self.layout, revision, items)
        return {node: thaw_json(info) for node, info in snap.members.items()}

    # ---- internals ---------------------------------------------------------------------------

    async def _get_prefix(self, op: str, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        res = await self._call(op, lambda c: c.get_prefix(prefix.encode()))
        items = [(bytes(kv.key).decode("utf-8", errors="replace"), bytes(kv.value)) for kv in res]
        return items, int(res.header.revision)

    async def _grant(self, ttl_s: int) -> int:
        lease = await self._call("grant_lease", lambda c: c.lease(ttl_s))
        return int(lease.id)

    async def _grant_and_put(self, key: str, value: bytes, ttl_s: int) -> int:
        lease_id = await self._grant(ttl_s)
        try:
            await self._call("put", lambda c: c.put(key.encode(), value, lease=lease_id))
        except BaseException:
            await self._revoke_quietly(lease_id)
            raise
        return lease_id

    async def _refresh(self, lease_id: int, timeout_s: float | None = None) -> int:
        """Remaining TTL after a keep-alive; <= 0 means etcd no longer knows the lease."""
        reply = await self._call("refresh_lease", lambda c: c.refresh_lease(lease_id), timeout_s)
        return -1 if reply is None else int(reply.TTL)

    async def _revoke(self, lease_id: int) -> None:
        with contextlib.suppress(NotFound):  # already expired: same outcome
            await self._call("revoke_lease", lambda c: c.revoke_lease(lease_id))

    async def _revoke_quietly(self, lease_id: int) -> None:
        with contextlib.suppress(ColshardError):
            await self._revoke(lease_id)

    def _start_lease(
        self,
        key: str,
        value: bytes,
        ttl_s: int,
        lease_id: int,
        started: float,
    ) -> MemberLease:
        lease = MemberLease(self, key, value, ttl_s, lease_id, started)
        lease._task = asyncio.get_running_loop().create_task(
            lease._keep_alive(), name=f"colshard-etcd-lease:{key}"
        )
        self._leases.add(lease)
        return lease


class MemberLease:
    """A key held by a lease that a background task refreshes every ttl/3.

    active --refresh fails--> retrying --etcd answers, lease alive--> active
    etcd answers "lease gone" (it expired while we were cut off):
        --> new lease, key written again --> active
    keep-alive task crashed (a bug) --> lost
    any --revoke()--> revoked (key deleted now)
    any --stop_refreshing()--> abandoned (key expires after the TTL, as if the node died)
    """

    def __init__(
        self, store: EtcdStore, key: str, value: bytes, ttl_s: int, lease_id: int, started: float
    ) -> None:
        self._store = store
        self.key = key
        self._value = value
        self.ttl_s = ttl_s
        self._lease_id = lease_id
        self._confirmed_at = started  # when the last confirmed refresh was *sent*
        self._task: asyncio.Task[None] | None = None
        self._ended = asyncio.Event()
        self.lost = False
        self.revoked = False

    @property
    def lease_id(self) -> int:
        return self._lease_id

    @property
    def active(self) -> bool:
        return not self._ended.is_set()

    async def wait_lost(self) -> None:
        """Return once the lease no longer holds its key: lost, revoked or abandoned."""
        await self._ended.wait()

    async def revoke(self) -> None:
        """Stop refreshing and revoke the lease: the key is deleted now. Idempotent.
        Raises Unavailable if etcd is unreachable (the key then expires after the TTL)."""
        await self.stop_refreshing()
        if not self.revoked and not self.lost:
            await self._store._revoke(self._lease_id)
            self.revoked = True

    async def stop_refreshing(self) -> None:
        """Stop the keep-alive task without revoking (the key expires after the TTL)."""
        task, self._task = self._task, None
        await _cancel_and_wait(task)
        self._ended.set()
        self._store._leases.discard(self)

    def _mark_lost(self, why: str) -> None:
        log.warning("etcd lease for %s lost: %s", self.key, why)
        self.lost = True
        self._ended.set()
        self._store._leases.discard(self)

    async def _keep_alive(self) -> None:
        try:
            await self._keep_alive_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: say so, and do not pretend to hold the key
            log.exception("etcd lease keep-alive for %s crashed", self.key)
            self._mark_lost(f"keep-alive crashed: {exc!r}")

    async def _keep_alive_loop(self) -> None:
        interval = self.ttl_s / 3
        retry = max(0.1, min(1.0, self.ttl_s / 10))
        delay = interval
        while True:
            await asyncio.sleep(delay)
            sent_at = time.monotonic()
            try:
                remaining = await self._store._refresh(self._lease_id)
            except ColshardError as exc:
                log.info("etcd lease refresh for %s failed (retrying): %s", self.key, exc)
                delay = retry
                continue
            if remaining <= 0:
                try:
                    self._lease_id = await self._store._grant_and_put(
                        self.key, self._value, self.ttl_s
                    )
                except ColshardError as exc:
                    log.info("re-registering %s failed (retrying): %s", self.key, exc)
                    delay = retry
                    continue
                log.warning("etcd lease for %s had expired; registered again", self.key)
            self._confirmed_at = sent_at
            delay = interval

    def __repr__(self) -> str:
        state = (
            "lost"
            if self.lost
            else "revoked"
            if self.revoked
            else "active"
            if self.active
            else "stopped"
        )
        return f"MemberLease({self.key!r}, ttl_s={self.ttl_s}, {state})"
