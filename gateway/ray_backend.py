"""``RayTransport``: the gateway's calls to the named ``CoordinatorActor`` across Ray (a
``gateway.backend.Transport``). The only gateway module besides the CLI that imports Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
import ray.exceptions

from cluster.errors import ColshardError, DeadlineExceeded, InternalError, Unavailable


class RayTransport:
    def __init__(self, handle: Any, default_timeout_s: float) -> None:
        self._handle = handle
        self._timeout_s = default_timeout_s

    async def call(self, method: str, args: tuple[Any, ...], timeout_s: float | None) -> Any:
        ref = getattr(self._handle, method).remote(*args)
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(ref.future()), timeout_s or self._timeout_s
            )
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ColshardError):
                raise exc.cause from None
            raise InternalError(f"coordinator failed: {exc.cause!r}") from exc
        except TimeoutError as exc:
            raise DeadlineExceeded(f"coordinator did not answer {method} in time") from exc
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise Unavailable(f"coordinator unavailable: {type(exc).__name__}") from exc
