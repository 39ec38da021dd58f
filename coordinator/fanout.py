"""All Ray actor *calls* of the coordinator live here (creation lives in placement.py).

``ShardClient`` is the small interface the coordinator uses to reach one shard replica; unit
tests put in-process engines behind the same interface. ``RayShardClient`` implements it over
the replica's shard host (``shard.host``) and maps Ray's exceptions to colshard's, naming the
shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import ray
import ray.exceptions

from cluster import localrpc
from cluster.errors import (
    ColshardError,
    DeadlineExceeded,
    InternalError,
    ShardNotOpen,
    Unavailable,
)
from cluster.ids import ShardId
from cluster.localrpc import body_length, frame, unframe
from cluster.raynode import ray_node_id
from cluster.timing import READY_PROBE_TIMEOUT_S
from cluster.types import (
    F32,
    KeywordSearch,
    ObjectBatch,
    ShardSearchResult,
    ShardStats,
    StoredObject,
    VectorSearch,
    WriteResult,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


class ShardClient(Protocol):
    shard_id: ShardId

    async def ready(self, timeout_s: float) -> Mapping[str, Any]: ...
    async def upsert(self, batch: ObjectBatch, timeout_s: float) -> list[WriteResult]: ...
    async def delete(self, uuids: Sequence[str], timeout_s: float) -> list[bool]: ...
    async def get(
        self, uuid: str, include_vectors: bool, timeout_s: float
    ) -> StoredObject | None: ...
    async def search(self, req: VectorSearch, timeout_s: float) -> ShardSearchResult: ...
    async def keyword_search(self, req: KeywordSearch, timeout_s: float) -> ShardSearchResult: ...
    async def list_objects(
        self, after: str | None, limit: int, include_vectors: bool, timeout_s: float
    ) -> list[StoredObject]: ...
    async def stats(self, timeout_s: float) -> ShardStats: ...
    async def sample_queries(
        self, vector: str, n: int, seed: int, timeout_s: float
    ) -> list[F32]: ...
    async def drop(self, timeout_s: float) -> None: ...
    async def clear_lost(self, timeout_s: float) -> str | None: ...
    async def stage_backup(self, timeout_s: float) -> dict[str, Any]: ...
    async def finish_backup(self, staging: str, dest: str, timeout_s: float) -> dict[str, Any]: ...
    async def restore(self, src: str, timeout_s: float) -> dict[str, Any]: ...


def map_ray_error(exc: BaseException, what: str, details: dict[str, Any]) -> ColshardError:
    """One place that turns Ray's exceptions into colshard errors naming the callee
    (``what``: e.g. "shard Demo:1")."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, ColshardError):
            return cause
        return InternalError(f"{what} failed: {cause!r}", details)
    if isinstance(exc, ColshardError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | ray.exceptions.GetTimeoutError):
        return DeadlineExceeded(f"{what} did not answer in time", details)
    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
        return Unavailable(f"{what} is unavailable: {type(exc).__name__}", details)
    return InternalError(f"{what}: {exc!r}", details)


async def call_remote(ref: Any, timeout_s: float, what: str, details: dict[str, Any]) -> Any:
    try:
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)
    except (TimeoutError, Exception) as exc:
        raise map_ray_error(exc, what, details) from exc


_SHARED_FAST: dict[tuple[int, str], FastPathClient] = {}


class FastPathDown(Exception):
    """The fast path's socket failed (the actor died, restarted, or closed it)."""


class FastPathClient:
    """Calls a shard's same-node fast path (``cluster.localrpc``); a few pooled connections, one
    call per connection at a time. Transport failures raise ``FastPathDown`` (the caller goes
    over Ray instead); a missed deadline raises ``DeadlineExceeded``; the shard's own errors are
    raised as they are."""

    MAX_CALLS = 32  # in flight per shard host (all its shards' searches), each a host thread

    def __init__(self, path: str) -> None:
        self.path = path
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(self.MAX_CALLS)
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def shared(cls, path: str) -> FastPathClient:
        """The one client of socket ``path`` in this event loop: the shards of a host share its
        socket, its connections and its cap on calls in flight."""
        loop = asyncio.get_running_loop()
        key = (id(loop), path)
        client = _SHARED_FAST.get(key)
        if client is None or client._loop is not loop:
            client = _SHARED_FAST[key] = cls(path)
            client._loop = loop
        return client

    async def call(
        self,
        method: str,
        args: tuple[Any, ...],
        timeout_s: float,
        what: str,
        details: dict[str, Any],
    ) -> Any:
        try:
            if self._slots.locked():  # else acquire() returns at once: no timer, no task
                await asyncio.wait_for(self._slots.acquire(), timeout_s)
            else:
                await self._slots.acquire()
        except TimeoutError:
            raise DeadlineExceeded(f"{what} did not answer in time", details) from None
        try:
            return await self._call(method, args, timeout_s, what, details)
        finally:
            self._slots.release()

    async def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        timeout_s: float,
        what: str,
        details: dict[str, Any],
    ) -> Any:
        conn = self._idle.pop() if self._idle else None
        done = False
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_unix_connection(self.path), timeout_s)
            reader, writer = conn
            writer.write(frame((method, args)))
            # asyncio.timeout, not wait_for: the exchange runs in this task (no task per call).
            async with asyncio.timeout(timeout_s):
                await writer.drain()
                header = await reader.readexactly(4)
                ok, value = unframe(await reader.readexactly(body_length(header)))
            done = True
        except TimeoutError:
            raise DeadlineExceeded(f"{what} did not answer in time", details) from None
        except (OSError, EOFError, ValueError) as exc:  # IncompleteReadError is an EOFError
            raise FastPathDown(repr(exc)) from exc
        finally:
            if conn is not None:
                if done:
                    self._idle.append(conn)
                else:  # mid-call (deadline, cancel, error): never reuse it
                    conn[1].close()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class HostLocator(Protocol):
    """Where a shard replica lives (``coordinator.placement.RayPlacement``)."""

    def locate(self, key: str, host_died: bool = False) -> tuple[Any, tuple[Any, ...]] | None: ...
    def opened(self, key: str) -> None: ...


class RayShardClient:
    """A ShardClient for one shard replica held by a shard host (``shard.host``).

    The replica is placed and opened by its first call (``ready()`` opens it; every call made
    before it does). A call that finds the host restarting is re-issued with backoff while
    the deadline allows; one that finds the host restarted without the shard open
    (``ShardNotOpen``) opens it there again and retries; one that finds the host dead for good
    asks placement for a host again (another node when that one is gone). Every shard verb is
    idempotent (upserts carry their uuids), so a retried write cannot duplicate anything.
    """

    RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)

    FAST_PATH_RETRY_S = 5.0

    def __init__(self, shard_id: ShardId, key: str, locator: HostLocator) -> None:
        self.shard_id = shard_id
        self.key = key
        self._locator = locator
        self._host: Any = None
        self._open_args: tuple[Any, ...] = ()
        self._host_died = False
        self._retired = False
        self._what = f"shard {shard_id}"
        self._details: dict[str, Any] = {"shard": str(shard_id)}
        self._fast: FastPathClient | None = None
        self._fast_checked = 0.0
        self._refresh: asyncio.Task[Any] | None = None

    def _learn(self, info: Mapping[str, Any]) -> None:
        """Use the replica's fast path when it runs on this node (see ``cluster.localrpc``)."""
        self._fast_checked = time.monotonic()
        path = info.get("fast_path")
        usable = bool(path) and info.get("node_id") == ray_node_id() and localrpc.enabled()
        if not usable:
            self._drop_fast()
        elif self._fast is None or self._fast.path != path:
            self._drop_fast()
            self._fast = FastPathClient.shared(str(path))

    def _drop_fast(self) -> None:
        if self._fast is not None:
            self._fast.close()  # its idle connections: the host's other shards open new ones
            self._fast = None

    async def _read(self, method: str, timeout_s: float, *args: Any) -> Any:
        """A read verb: over the fast path when there is one, else (and when it fails) over
        Ray. Without a fast path, one is looked for again now and then (``ready()`` in the
        background), e.g. after the host restarted."""
        fast = self._fast
        if fast is not None:
            try:
                return await fast.call(
                    method, (self.key, *args), timeout_s, self._what, dict(self._details)
                )
            except (FastPathDown, ShardNotOpen) as exc:
                log.info("%s: fast path down (%s); over Ray", self._what, exc)
                if self._fast is fast:  # not one learned meanwhile
                    self._drop_fast()
                self._fast_checked = time.monotonic()
        elif time.monotonic() - self._fast_checked > self.FAST_PATH_RETRY_S and (
            self._refresh is None or self._refresh.done()
        ):
            self._fast_checked = time.monotonic()
            self._refresh = asyncio.ensure_future(self._quiet_ready())
        return await self._call(method, timeout_s, *args, retry=False)

    async def _quiet_ready(self) -> None:
        with contextlib.suppress(ColshardError):
            await self.ready(READY_PROBE_TIMEOUT_S)

    async def _located(self) -> Any:
        if self._host is None or self._host_died:
            found = await asyncio.to_thread(self._locator.locate, self.key, self._host_died)
            if found is None:
                raise Unavailable(
                    f"{self._what}: no alive node has room for it", dict(self._details)
                )
            self._host, self._open_args = found
            self._host_died = False
        return self._host

    async def _remote(self, verb: str, args: tuple[Any, ...], timeout_s: float) -> Any:
        host = await self._located()
        if verb == "open":
            ref = host.open.options(name=f"{self.key}.open").remote(self.key, *self._open_args)
        else:
            ref = host.call.options(name=f"{self.key}.{verb}").remote(self.key, verb, args)
        try:
            return await call_remote(ref, timeout_s, self._what, dict(self._details))
        except Unavailable as exc:
            if isinstance(exc.__cause__, ray.exceptions.ActorDiedError):
                self._host_died = True  # gone for good: the next call looks for a host again
                self._drop_fast()
            raise

    async def _open(self, timeout_s: float) -> Mapping[str, Any]:
        info: Mapping[str, Any] = await self._remote("open", (), timeout_s)
        self._locator.opened(self.key)
        self._learn(info)
        return info

    async def _call(
        self, method: str, timeout_s: float, *args: Any, retry: bool = True, reopen: bool = True
    ) -> Any:
        """Reads pass ``retry=False``: the coordinator's ReplicaSet fails them over to another
        replica (and retries the round itself), instead of waiting here for a restart. A
        shard its host does not hold (restarted) is opened again, then the call retried,
        unless ``reopen`` is False or this client's replica was dropped (deleted, or moved
        to another node)."""
        if self._retired:
            raise Unavailable(
                f"{self._what}: this copy was dropped (its collection was deleted, or it moved)",
                dict(self._details),
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for attempt in range(len(self.RETRY_BACKOFF_S) + 1):
            try:
                if method == "ready":
                    return await self._open(max(0.001, deadline - loop.time()))
                return await self._remote(method, args, max(0.001, deadline - loop.time()))
            except ShardNotOpen:
                if not reopen or self._retired:
                    raise
                await self._open(max(0.001, deadline - loop.time()))
                return await self._remote(method, args, max(0.001, deadline - loop.time()))
            except Unavailable:
                if not retry or attempt == len(self.RETRY_BACKOFF_S):
                    raise
                pause = self.RETRY_BACKOFF_S[attempt]
                if loop.time() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def ready(self, timeout_s: float) -> Mapping[str, Any]:
        """Open the replica on its host (a no-op when open) and say where it runs."""
        result: Mapping[str, Any] = await self._call("ready", timeout_s)
        return result

    async def upsert(self, batch: ObjectBatch, timeout_s: float) -> list[WriteResult]:
        result: list[WriteResult] = await self._call("upsert", timeout_s, batch)
        return result

    async def delete(self, uuids: Sequence[str], timeout_s: float) -> list[bool]:
        result: list[bool] = await self._call("delete", timeout_s, list(uuids))
        return result

    async def get(self, uuid: str, include_vectors: bool, timeout_s: float) -> StoredObject | None:
        result: StoredObject | None = await self._call(
            "get", timeout_s, uuid, include_vectors, retry=False
        )
        return result

    async def search(self, req: VectorSearch, timeout_s: float) -> ShardSearchResult:
        # The shard stops its own work once this caller has given up (shard.search.Deadline).
        req = dataclasses.replace(req, budget_s=timeout_s)
        result: ShardSearchResult = await self._read("search", timeout_s, req)
        return result

    async def keyword_search(self, req: KeywordSearch, timeout_s: float) -> ShardSearchResult:
        result: ShardSearchResult = await self._read("keyword_search", timeout_s, req)
        return result

    async def list_objects(
        self, after: str | None, limit: int, include_vectors: bool, timeout_s: float
    ) -> list[StoredObject]:
        result: list[StoredObject] = await self._call(
            "list_objects", timeout_s, after, limit, include_vectors, retry=False
        )
        return result

    async def stats(self, timeout_s: float) -> ShardStats:
        result: ShardStats = await self._call("stats", timeout_s, retry=False)
        return result

    async def sample_queries(self, vector: str, n: int, seed: int, timeout_s: float) -> list[F32]:
        result: list[F32] = await self._call(
            "sample_queries", timeout_s, vector, n, seed, retry=False
        )
        return result

    async def drop(self, timeout_s: float) -> None:
        """Delete this copy's data; the client is retired (later calls fail, nothing is
        reopened)."""
        await self._call("drop", timeout_s, reopen=False)
        self._retired = True

    async def clear_lost(self, timeout_s: float) -> str | None:
        result: str | None = await self._call("clear_lost", timeout_s)
        return result

    async def stage_backup(self, timeout_s: float) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("stage_backup", timeout_s, retry=False)
        return result

    async def finish_backup(self, staging: str, dest: str, timeout_s: float) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "finish_backup", timeout_s, staging, dest, retry=False
        )
        return result

    async def restore(self, src: str, timeout_s: float) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("restore", timeout_s, src, retry=False)
        return result


async def gather_shards(
    calls: Mapping[int, Awaitable[T]], *, allow_partial: bool
) -> tuple[dict[int, T], dict[int, ColshardError]]:
    """Run per-shard calls concurrently. Without ``allow_partial`` the first failure (in shard
    order) is raised; with it, failed shards are returned beside the results."""
    shards = list(calls)
    outcomes = await asyncio.gather(*calls.values(), return_exceptions=True)
    results: dict[int, T] = {}
    failures: dict[int, ColshardError] = {}
    for shard, outcome in zip(shards, outcomes, strict=True):
        if isinstance(outcome, ColshardError):
            failures[shard] = outcome
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            results[shard] = outcome
    if failures and not allow_partial:
        raise failures[min(failures)]
    return results, failures


class RayVectorizerClient:
    """A VectorizerClient over a pool of VectorizerActor handles: each call goes to the next
    actor (round-robin); ``parallelism`` tells callers how many calls to keep in flight."""

    def __init__(self, handles: Sequence[Any], name: str) -> None:
        if not handles:
            raise ValueError("a vectorizer pool needs at least one actor")
        self._handles = list(handles)
        self._next = itertools.cycle(range(len(self._handles)))
        self._name = name

    @property
    def parallelism(self) -> int:
        return len(self._handles)

    @property
    def _handle(self) -> Any:
        return self._handles[next(self._next)]

    async def _call(self, ref: Any, timeout_s: float) -> Any:
        return await call_remote(
            ref, timeout_s, f"vectorizer {self._name}", {"vectorizer": self._name}
        )

    async def dim(self, timeout_s: float) -> int:
        return int(await self._call(self._handle.dim.remote(), timeout_s))

    async def encode_documents(
        self, texts: Sequence[str], api_key: str | None, timeout_s: float
    ) -> list[Any]:
        result: list[Any] = await self._call(
            self._handle.encode_documents.remote(list(texts), api_key), timeout_s
        )
        return result

    async def encode_query(self, text: str, api_key: str | None, timeout_s: float) -> Any:
        return await self._call(self._handle.encode_query.remote(text, api_key), timeout_s)
