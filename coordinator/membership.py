"""Membership and shard availability, reconciled by the coordinator every few seconds.

Every Ray node holds ``members/<node_id>`` in etcd through its node agent
(``coordinator.node_agent``); the key is bound to a lease, so it disappears a TTL after the
node dies. ``MembershipMonitor.tick`` (every ``Settings.membership_interval_s``):

1. starts a node agent on every alive Ray node that is not a member yet (a node that joined,
   or whose agent died);
2. reads the members;
3. checks every replica in the routing table (``coordinator.routing``). A replica whose node is
   a member and that has no outage is left alone (no call). Any other replica is probed with
   ``ready()``: if it answers from a member node (Ray restarted it elsewhere, or its node is
   back) its entry takes that node and its outage ends; otherwise an outage starts::

       available --node not a member, no answer from a member node--> unavailable
       unavailable --answers ready() from a member node--> available (its sync state,
                                                           ready or stale, never changed)

The monitor reports to the ``Router``, the one writer of routing truth, which makes the new
snapshot and writes the placement record to etcd. ``/v1/cluster`` shows the outage and
``/readyz`` reports a shard with no available replica as not ready, both from the snapshot.
Plain async Python over small interfaces; unit tests drive it with fakes, ``CoordinatorActor``
wires it to etcd and Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from cluster.errors import ColshardError
from cluster.timing import PROBE_TIMEOUT_S
from coordinator.routing import ReplicaEntry, Router, outage_ended, outage_started

log = logging.getLogger(__name__)


class NodeAgents(Protocol):
    async def alive_nodes(self) -> dict[str, dict[str, Any]]: ...
    async def ensure(self, node_id: str, node: Mapping[str, Any]) -> None: ...


class MembershipStore(Protocol):
    async def list_members(self) -> dict[str, dict[str, Any]]: ...


class MembershipMonitor:
    def __init__(
        self,
        store: MembershipStore,
        agents: NodeAgents,
        router: Router,
        interval_s: float = 2.0,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self._store = store
        self._agents = agents
        self._router = router
        self._interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._tick_lock = asyncio.Lock()

    # ---- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="colshard-membership"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.tick()
            except ColshardError as exc:  # etcd unreachable: try again next round
                log.warning("membership round failed: %s", exc)
            except Exception:  # a bug must not end the loop
                log.exception("membership round failed")

    async def tick(self) -> dict[str, Any]:
        """One reconciliation round (see the module docstring); returns what it did."""
        async with self._tick_lock:
            started = await self._reconcile_agents()
            members = await self._store.list_members()
            changed = await self._reconcile_replicas(members)
            down = [str(e.id) for e in self._router.table.entries() if e.outage is not None]
            return {
                "agents_started": started,
                "members": sorted(members),
                "changed": changed,
                "unavailable": down,
            }

    async def _reconcile_agents(self) -> list[str]:
        nodes = await self._agents.alive_nodes()
        members = await self._store.list_members()
        missing = [n for n in sorted(nodes) if n not in members]
        outcomes = await asyncio.gather(
            *(self._agents.ensure(n, nodes[n]) for n in missing), return_exceptions=True
        )
        started = []
        for node_id, outcome in zip(missing, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                log.warning("node agent on %s not started yet: %r", node_id[:8], outcome)
            else:
                log.info("node agent on %s registered", node_id[:8])
                started.append(node_id)
        return started

    async def _reconcile_replicas(self, members: Mapping[str, Any]) -> list[str]:
        checks = [
            self._check(e, members)
            for e in self._router.table.entries()
            if e.node_id not in members or e.outage is not None
        ]
        return [name for name in await asyncio.gather(*checks) if name is not None]

    async def _check(self, entry: ReplicaEntry, members: Mapping[str, Any]) -> str | None:
        """Probe one replica; report to the router if its availability or node changed."""
        where: Mapping[str, Any] | None = None
        try:
            where = await entry.client.ready(self._probe_timeout_s)
        except ColshardError as exc:
            log.debug("%s does not answer: %s", entry.id, exc)
        if where is not None and where.get("node_id") in members:
            if not outage_ended(self._router, entry.id, where):
                return None
            if entry.outage is not None:
                log.warning("%s is available again on node %s", entry.id, str(where["node_id"])[:8])
            return str(entry.id)
        if not outage_started(self._router, entry.id):
            return None
        log.warning("%s is unavailable: node %s is not a member", entry.id, entry.node_id[:8])
        return str(entry.id)
