"""The typed seam between gateway and coordinator (cluster.api, gateway.backend): every verb the
gateway can call exists on the coordinator actor with the same parameters, and ``Backend``
sends each verb by its own name with its arguments in order."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from cluster.api import VERBS, CoordinatorAPI
from coordinator.actor import CoordinatorActor
from gateway.backend import Backend


def _params(fn: Any) -> list[tuple[str, Any]]:
    # Ray adds ``_ray_trace_ctx`` to an actor class's methods once it has made it remote.
    skip = ("self", "_ray_trace_ctx")
    return [
        (p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name not in skip
    ]


def test_the_api_lists_the_coordinator_verbs() -> None:
    assert set(VERBS) >= {"query", "upsert", "readiness", "create_collection"}
    public = {
        n
        for n, _ in inspect.getmembers(Backend, inspect.iscoroutinefunction)
        if not n.startswith("_")
    }
    assert public == set(VERBS)  # no verb the Protocol lacks, none it has missing


@pytest.mark.parametrize("verb", VERBS)
def test_actor_and_backend_take_the_verbs_parameters(verb: str) -> None:
    api = _params(getattr(CoordinatorAPI, verb))
    assert _params(getattr(CoordinatorActor, verb)) == api
    backend = inspect.signature(getattr(Backend, verb)).parameters
    assert _params(getattr(Backend, verb)) == [*api, ("timeout_s", None)]
    assert backend["timeout_s"].kind is inspect.Parameter.KEYWORD_ONLY


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], float | None]] = []

    async def call(self, method: str, args: tuple[Any, ...], timeout_s: float | None) -> Any:
        self.calls.append((method, args, timeout_s))
        return method


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.anyio
async def test_backend_sends_each_verb_by_name_with_its_arguments(verb: str) -> None:
    transport = Recorder()
    names = [n for n, _ in _params(getattr(CoordinatorAPI, verb))]
    args = tuple(f"arg-{n}" for n in names)
    result = await getattr(Backend(transport), verb)(*args, timeout_s=7.5)
    assert transport.calls == [(verb, args, 7.5)]
    assert result == (None if verb in ("delete_collection", "delete_backup") else verb)
