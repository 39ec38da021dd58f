"""How the gateway reaches the coordinator: one ``call(method, *args)`` seam.

``RayBackend`` calls the named ``CoordinatorActor`` (all of the gateway's Ray calls live here);
``LocalBackend`` calls an in-process object with the same async methods (unit tests, and the
gateway embedded in the coordinator actor, ``gateway.server.EmbeddedGateway``).
Errors come back as colshard errors whatever the transport.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import ray
import ray.exceptions

from cluster.errors import ColshardError, DeadlineExceeded, InternalError, Unavailable


class Backend(Protocol):
    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any: ...


class LocalBackend:
    """Calls ``target``'s async methods directly. With ``detach`` a call the gateway stops
    waiting for (its timeout, or the request task cancelled) runs on to its end, as a call
    across Ray would: the embedded gateway must not cancel the coordinator's work halfway.

    A ``query`` is never detached: it changes nothing, so one the gateway gives up on is
    cancelled (its shard calls are dropped, freeing the coordinator), and it runs in the
    request's own task, one task switch less per query than a shielded call."""

    READ_ONLY = frozenset({"query"})

    def __init__(self, target: Any, *, detach: bool = False) -> None:
        self._target = target
        self._detach = detach

    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        work = getattr(self._target, method)(*args)
        try:
            if self._detach and method not in self.READ_ONLY:
                return await asyncio.wait_for(asyncio.shield(work), timeout_s)
            async with asyncio.timeout(timeout_s):
                return await work
        except TimeoutError as exc:
            raise DeadlineExceeded(f"coordinator did not answer {method} in time") from exc


class RayBackend:
    def __init__(self, handle: Any, default_timeout_s: float) -> None:
        self._handle = handle
        self._timeout_s = default_timeout_s

    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        ref = getattr(self._handle, method).remote(*args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()),
                                          timeout_s or self._timeout_s)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ColshardError):
                raise exc.cause from None
            raise InternalError(f"coordinator failed: {exc.cause!r}") from exc
        except TimeoutError as exc:
            raise DeadlineExceeded(f"coordinator did not answer {method} in time") from exc
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise Unavailable(f"coordinator unavailable: {type(exc).__name__}") from exc
