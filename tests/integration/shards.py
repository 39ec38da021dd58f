"""Reach one shard replica inside its shard host (``shard.host``) directly, as the tests used
to reach a shard's own actor: its verbs, and the pid of the process holding it."""

from __future__ import annotations

import time
from typing import Any

from tests.integration.conftest import Server


class ShardRef:
    """Replica ``key`` (``colshard:<collection>:<shard>[:<replica>]``) in the host holding it.
    The host handle is looked up once: it stays valid across the host's restarts."""

    def __init__(self, server: Server, key: str, timeout_s: float = 60.0) -> None:
        import ray

        from coordinator.actor import ray_namespace

        self.key = key
        self.namespace = ray_namespace(server.settings.cluster_name)
        deadline = time.monotonic() + timeout_s
        while True:
            for entry in ray.util.list_named_actors(all_namespaces=True):
                if entry["namespace"] != self.namespace or not entry["name"].startswith(
                    "colshard:host:"
                ):
                    continue
                host = ray.get_actor(entry["name"], namespace=self.namespace)
                if key in ray.get(host.info.remote(), timeout=timeout_s)["shards"]:
                    self.host, self.host_name = host, entry["name"]
                    return
            assert time.monotonic() < deadline, f"no shard host holds {key}"
            time.sleep(0.2)

    def call(self, verb: str, *args: Any, timeout_s: float = 60.0) -> Any:
        import ray

        return ray.get(self.host.call.remote(self.key, verb, args), timeout=timeout_s)

    def pid(self, timeout_s: float = 120.0) -> int:
        """The host's pid once it answers (asked again while Ray restarts it)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return int(ray.get(self.host.info.remote(), timeout=timeout_s)["pid"])
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def ready_after_restart(self, old_pid: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """The replica's ``ready()`` from a host process other than ``old_pid`` (the restarted
        host reopens it from its list of held shards)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                info: dict[str, Any] = self.call("ready", timeout_s=10)
                if info["pid"] != old_pid:
                    return info
            except ray.exceptions.RayError:
                pass  # restarting, or not reopened yet
            assert time.monotonic() < deadline, f"{self.key} did not come back"
            time.sleep(0.3)

    def kill(self, no_restart: bool) -> None:
        """``ray.kill`` of the host (every replica it holds goes with it)."""
        import ray

        ray.kill(self.host, no_restart=no_restart)
