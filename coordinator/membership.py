"""Membership and shard availability, reconciled by the coordinator every few seconds.

Every Ray node holds ``members/<node_id>`` in etcd through its node agent
(``coordinator.node_agent``); the key is bound to a lease, so it disappears a TTL after the
node dies. ``MembershipMonitor.tick`` (every ``Settings.membership_interval_s``):

1. starts a node agent on every alive Ray node that is not a member yet (a node that joined,
   or whose agent died);
2. reads the members;
3. checks the placement of every shard replica. A replica whose node is a member and that is
   not marked unavailable is left alone (no call). Any other replica is probed with ``ready()``:
   if it answers from a member node (Ray restarted it elsewhere, or its node is back) its
   placement is rewritten with that node and its previous state; otherwise its placement
   state becomes ``unavailable``::

       ready / stale --node not a member, no answer from a member node--> unavailable
       unavailable --answers ready() from a member node--> the state it had before

The unavailable replicas are also kept in memory: ``annotate`` overlays them on ``/v1/cluster``
(etcd may briefly hold another writer's record) and ``unavailable_shards`` (shards with no
available replica) makes ``/readyz`` report not ready. Plain async Python over small
interfaces; unit tests drive it with fakes, ``CoordinatorActor`` wires it to etcd and Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.errors import ColshardError, NotFound
from coordinator.fanout import ShardClient

log = logging.getLogger(__name__)

UNAVAILABLE = "unavailable"
DATA_LOST = "data_lost"  # shown (never stored): the replica answers, without its data
PROBE_TIMEOUT_S = 2.0
STATS_TIMEOUT_S = 2.0

Key = tuple[str, int, int]  # collection, shard, replica
# collection -> shard -> replica clients: the coordinator's routing table
ShardLookup = Callable[[], Mapping[str, Sequence[Sequence[ShardClient]]]]


class NodeAgents(Protocol):
    async def alive_nodes(self) -> dict[str, dict[str, Any]]: ...
    async def ensure(self, node_id: str, node: Mapping[str, Any]) -> None: ...


class MembershipStore(Protocol):
    async def list_members(self) -> dict[str, dict[str, Any]]: ...
    async def get_placements(self, collection: str) -> dict[tuple[int, int], dict[str, Any]]: ...
    async def put_placement(self, collection: str, shard: int, replica: int,
                            info: Mapping[str, Any]) -> None: ...


@dataclass
class Outage:
    node_id: str
    since: float
    previous_state: str


def key_name(key: Key) -> str:
    return f"{key[0]}:{key[1]}:{key[2]}"


class MembershipMonitor:
    def __init__(self, store: MembershipStore, agents: NodeAgents, shards: ShardLookup,
                 interval_s: float = 2.0, probe_timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self._store = store
        self._agents = agents
        self._shards = shards
        self._interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self.outages: dict[Key, Outage] = {}
        self._task: asyncio.Task[None] | None = None
        self._tick_lock = asyncio.Lock()

    # ---- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="colshard-membership")

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
            changed = await self._reconcile_placements(members)
            return {"agents_started": started, "members": sorted(members),
                    "changed": changed, "unavailable": sorted(map(key_name, self.outages))}

    async def _reconcile_agents(self) -> list[str]:
        nodes = await self._agents.alive_nodes()
        members = await self._store.list_members()
        missing = [n for n in sorted(nodes) if n not in members]
        outcomes = await asyncio.gather(*(self._agents.ensure(n, nodes[n]) for n in missing),
                                        return_exceptions=True)
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

    async def _reconcile_placements(self, members: Mapping[str, Any]) -> list[str]:
        changed: list[str] = []
        live: set[Key] = set()
        for collection, shards in self._shards().items():
            try:
                placements = await self._store.get_placements(collection)
            except NotFound:
                continue
            checks = []
            for s, replicas in enumerate(shards):
                for r, client in enumerate(replicas):
                    key = (collection, s, r)
                    live.add(key)
                    record = placements.get((s, r), {})
                    healthy = (record.get("node_id") in members
                               and record.get("state") != UNAVAILABLE
                               and key not in self.outages)
                    if not healthy:
                        checks.append(self._check(key, client, record, members))
            for name in await asyncio.gather(*checks):
                if name is not None:
                    changed.append(name)
        for key in set(self.outages) - live:  # collection dropped
            del self.outages[key]
        return changed

    async def _check(self, key: Key, client: ShardClient, record: Mapping[str, Any],
                     members: Mapping[str, Any]) -> str | None:
        """Probe one replica; write its placement if its availability changed."""
        where: Mapping[str, Any] | None = None
        try:
            where = await client.ready(self._probe_timeout_s)
        except ColshardError as exc:
            log.debug("%s does not answer: %s", key_name(key), exc)
        outage = self.outages.get(key)
        if where is not None and where.get("node_id") in members:
            previous = outage.previous_state if outage else str(record.get("state") or "ready")
            new = {k: v for k, v in record.items() if k not in ("unavailable_since", "reason")}
            new.update(node_id=where["node_id"], host=where.get("host", ""),
                       pid=where.get("pid", 0),
                       state=previous if previous != UNAVAILABLE else "ready")
            self.outages.pop(key, None)
            if new == dict(record):
                return None
            if outage is not None:
                log.warning("%s is available again on node %s", key_name(key),
                            str(where["node_id"])[:8])
            await self._put(key, new)
            return key_name(key)
        if outage is None:
            previous = str(record.get("state") or "ready")
            outage = Outage(str(record.get("node_id", "")), time.time(), previous)
            self.outages[key] = outage
            log.warning("%s is unavailable: node %s is not a member", key_name(key),
                        outage.node_id[:8])
        if record.get("state") == UNAVAILABLE:
            return None
        await self._put(key, {**record, "state": UNAVAILABLE, "unavailable_since": outage.since,
                              "reason": f"node {outage.node_id} is not a member"})
        return key_name(key)

    async def _put(self, key: Key, record: Mapping[str, Any]) -> None:
        with contextlib.suppress(NotFound):  # the collection was dropped meanwhile
            await self._store.put_placement(key[0], key[1], key[2], record)

    # ---- views -------------------------------------------------------------------------------

    def unavailable_shards(self) -> list[str]:
        """``collection:shard`` of every shard none of whose replicas is available."""
        out = []
        for collection, shards in self._shards().items():
            for s, replicas in enumerate(shards):
                if replicas and all((collection, s, r) in self.outages
                                    for r in range(len(replicas))):
                    out.append(f"{collection}:{s}")
        return sorted(out)

    async def shard_stats(self, timeout_s: float = STATS_TIMEOUT_S) -> dict[Key, dict[str, Any]]:
        """Object/token/segment counts of every available replica (short deadline each)."""
        keys: list[Key] = []
        calls = []
        for collection, shards in self._shards().items():
            for s, replicas in enumerate(shards):
                for r, client in enumerate(replicas):
                    if (collection, s, r) not in self.outages:
                        keys.append((collection, s, r))
                        calls.append(client.stats(timeout_s))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        out: dict[Key, dict[str, Any]] = {}
        for key, stats in zip(keys, outcomes, strict=True):
            if isinstance(stats, BaseException):
                if not isinstance(stats, Exception):
                    raise stats
                continue
            out[key] = {"objects": stats.n_objects, "tokens": sum(stats.n_tokens.values()),
                        "segments": stats.n_segments, "bytes_on_disk": stats.bytes_on_disk}
            if stats.pid:  # the live process: the placement record's may predate a restart
                out[key]["pid"] = stats.pid
            if stats.data_lost:  # restarted without its data: shown as such, whatever state
                out[key].update(state=DATA_LOST, reason=stats.data_lost)
        return out

    def annotate(self, info: Mapping[str, Any], stats: Mapping[Key, Mapping[str, Any]]
                 ) -> dict[str, Any]:
        """``cluster_info`` with availability and counts overlaid on its placements."""
        collections: dict[str, Any] = {}
        for name, col in dict(info.get("collections") or {}).items():
            placements = []
            for p in col.get("placements", []):
                key = (name, int(p["shard"]), int(p["replica"]))
                p = dict(p)
                outage = self.outages.get(key)
                if outage is not None:
                    p.update(state=UNAVAILABLE, unavailable_since=outage.since)
                p.update(stats.get(key, {}))
                placements.append(p)
            per_shard: dict[int, int] = {}
            for p in placements:  # a shard's count: its fullest answering replica
                per_shard[p["shard"]] = max(per_shard.get(p["shard"], 0),
                                            int(p.get("objects", 0)))
            collections[name] = {**col, "placements": placements,
                                 "objects": sum(per_shard.values())}
        return {**info, "collections": collections,
                "unavailable_shards": self.unavailable_shards()}
