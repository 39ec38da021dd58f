"""Moving a shard replica to another node online, and draining a node (issue #21).

``move_replica`` copies one replica to a target node while it keeps serving:

1. the target copy is opened on the node's shard host as a new shard (``Placement.open_on``);
2. **bulk copy**: the copy is filled from a ready replica of the shard (the one moving, when
   it is ready) by the catch-up's anti-entropy pass (``replication.sync_replica``: page
   through both, upsert what is missing or differs, delete what is extra), while reads and
   writes go on as usual;
3. **the tail, and the switch**: under the shard's write lock (writes to that shard wait;
   reads go on) a second pass copies what was written during the first, the routing entry
   is switched to the new copy in one step (``Router.update``: client, node, ready), and
   placement records the new node; the placement record goes to etcd;
4. the old copy is dropped (its data directory deleted) ``DROP_GRACE_S`` after the switch,
   when the reads that picked it before the switch have finished; a read that still finds it
   gone fails over to the new entry.

Nothing acknowledged is lost: the switch happens while no write is in flight, after a pass
that saw every acknowledged write. A move also repairs: a stale replica moved from a ready
source arrives ready. One move per shard at a time (429 ``too_many_requests`` otherwise).

**Rebalancing** (``rebalance_once``, every ``Settings.rebalance_interval_s`` unless
``--no-rebalance``): when the shard node holding the most replicas holds at least two more
than the one holding the fewest (alive, not cordoned, with room), one ready replica moves from
the first to the second, one move per round. So a node that joins fills up a move at a time
until the counts are within one of each other; nothing moves on a balanced cluster.

``drain_node`` cordons a node (no new replica is placed there, ``Placement.cordon``) and moves
every replica on it to the node placement chooses (the same rule as for new replicas,
``coordinator.placement.choose_node``), one after the other, reporting each. ``undrain``
lifts the cordon. The cordon lives in the coordinator's memory: a restarted coordinator
forgets it (the moves it made stay, they are in etcd).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cluster.errors import ColshardError, InvalidInput, NotFound, TooManyRequests, Unavailable
from cluster.spec import CollectionSpec
from coordinator.fanout import ShardClient
from coordinator.queries import spec_in
from coordinator.replication import READY, Replica, ReplicaSet, sync_replica
from coordinator.routing import ReplicaState, Router

log = logging.getLogger(__name__)
# After a move's switch, how long the old copy keeps serving the reads already sent to it.
DROP_GRACE_S = 2.0


class MovePlacement(Protocol):
    """What moves need from placement (``coordinator.placement.RayPlacement``)."""

    def open_shard(
        self,
        spec: CollectionSpec,
        shard: int,
        replica: int,
        node_id: str = "",
        existed: bool = False,
    ) -> ShardClient: ...
    def open_on(
        self, spec: CollectionSpec, shard: int, replica: int, node_id: str
    ) -> ShardClient: ...
    def moved(self, spec: CollectionSpec, shard: int, replica: int, node_id: str) -> None: ...
    def choose_target(
        self, spec: CollectionSpec, shard: int, replica: int, leaving: str
    ) -> str | None: ...
    def refusal(
        self, spec: CollectionSpec, shard: int, replica: int, node_id: str
    ) -> str | None: ...
    def cordon(self, node_id: str, on: bool = True) -> frozenset[str]: ...
    def loads(self) -> dict[str, tuple[int, int | None]]: ...
    def alive_shard_nodes(self) -> dict[str, int | None]: ...


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in {*a, *b}}


def _source(rs: ReplicaSet, moving: Replica) -> Replica:
    """The replica to copy from: the moving one when it is ready, else another ready one."""
    if moving.state == READY:
        return moving
    ready = rs.read_order()
    if not ready:
        raise Unavailable(f"shard {rs.name} has no ready replica to copy from", {"shard": rs.name})
    return ready[0]


class Mover:
    """Replica moves and node drains of one coordinator (see the module docstring)."""

    def __init__(
        self,
        router: Router,
        placement: MovePlacement,
        timeout_s: Callable[[], float],
        drop_grace_s: float = DROP_GRACE_S,
    ) -> None:
        self._router = router
        self._placement = placement
        self._timeout_s = timeout_s
        self._drop_grace_s = drop_grace_s
        self._moving: set[tuple[str, int]] = set()

    def _replica(self, name: str, shard: int, replica: int) -> tuple[CollectionSpec, ReplicaSet]:
        table = self._router.table
        spec = spec_in(table, name)
        if not 0 <= shard < spec.shard_count:
            raise NotFound(
                f"collection {name!r} has no shard {shard} (0..{spec.shard_count - 1})",
                {"collection": name, "shard": shard},
            )
        if not 0 <= replica < spec.replication_factor:
            raise InvalidInput(
                f"shard {name}:{shard} has no replica {replica} (0..{spec.replication_factor - 1})",
                {"collection": name, "shard": shard, "replica": replica},
            )
        return spec, table.shard_sets(name)[shard]

    async def move(self, name: str, shard: int, replica: int, to_node: str) -> dict[str, Any]:
        """Move replica ``replica`` of shard ``name:shard`` to node ``to_node`` (see the module
        docstring); returns what was copied and how long it took."""
        spec, rs = self._replica(name, shard, replica)
        moving = rs.replicas[replica]
        from_node = moving.entry().node_id
        if to_node == from_node:
            raise InvalidInput(
                f"replica {name}:{shard}:{replica} is on node {to_node} already",
                {"node": to_node},
            )
        refusal = self._placement.refusal(spec, shard, replica, to_node)
        if refusal is not None:
            raise InvalidInput(refusal, {"node": to_node})
        siblings = [r.entry().node_id for r in rs.replicas if r is not moving]
        if to_node in siblings:
            raise InvalidInput(
                f"node {to_node} holds another replica of shard {name}:{shard}",
                {"node": to_node},
            )
        if (name, shard) in self._moving:
            raise TooManyRequests(
                f"a replica of shard {name}:{shard} is moving already", {"shard": f"{name}:{shard}"}
            )
        self._moving.add((name, shard))
        try:
            return await self._move(spec, rs, moving, from_node, to_node)
        finally:
            self._moving.discard((name, shard))

    async def _move(
        self, spec: CollectionSpec, rs: ReplicaSet, moving: Replica, from_node: str, to_node: str
    ) -> dict[str, Any]:
        timeout_s = self._timeout_s()
        started = time.monotonic()
        target = self._placement.open_on(spec, rs.shard, moving.index, to_node)
        where = await target.ready(timeout_s)
        try:
            bulk = await sync_replica(_source(rs, moving).client, target, timeout_s)
            bulk_s = time.monotonic() - started
            async with rs.write_lock:
                source = _source(rs, moving)
                tail = await sync_replica(source.client, target, timeout_s)
                old = moving.client
                self._placement.moved(spec, rs.shard, moving.index, to_node)
                client = self._placement.open_shard(
                    spec, rs.shard, moving.index, to_node, existed=True
                )
                where = await client.ready(timeout_s)  # the copy opened above: no reopen
                moving.last_ok_seq = source.last_ok_seq
                self._router.update(
                    moving.id,
                    client=client,
                    sync=ReplicaState.READY,
                    node_id=str(where.get("node_id", to_node)),
                    host=str(where.get("host", "")),
                    pid=int(where.get("pid", 0) or 0),
                    shard_host=str(where.get("shard_host", "")),
                    outage=None,
                )
        except BaseException:
            # The switch did not happen: the replica still serves from where it was.
            self._placement.moved(spec, rs.shard, moving.index, from_node)
            try:
                await target.drop(timeout_s)
            except ColshardError as exc:
                log.warning("dropping the unfinished copy on %s failed: %s", to_node, exc)
            raise
        await self._router.flush()
        await asyncio.sleep(self._drop_grace_s)
        dropped = True
        try:
            await old.drop(timeout_s)
        except ColshardError as exc:  # its node is gone, say: its directory stays there
            dropped = False
            log.warning(
                "replica %s:%d moved to %s; dropping its old copy on %s failed: %s",
                rs.name,
                moving.index,
                to_node,
                from_node,
                exc.message,
            )
        out = {
            "collection": spec.name,
            "shard": rs.shard,
            "replica": moving.index,
            "from_node": from_node,
            "to_node": to_node,
            "copied": _add(bulk, tail),
            "tail": tail,
            "bulk_s": round(bulk_s, 3),
            "seconds": round(time.monotonic() - started, 3),
            "old_copy_dropped": dropped,
        }
        log.warning("moved replica %s:%d: %s", rs.name, moving.index, out)
        return out

    async def drain(self, node_id: str) -> dict[str, Any]:
        """Cordon ``node_id`` and move every replica on it elsewhere; what moved, what could
        not (with why), and how many replicas are left on the node. NotFound for a node
        that is neither an alive shard node nor holds any replica."""
        holds = any(e.node_id == node_id for e in self._router.table.entries())
        if not holds and node_id not in self._placement.alive_shard_nodes():
            raise NotFound(
                f"node {node_id!r} is not an alive node that holds shards, and holds no replica",
                {"node": node_id},
            )
        self._placement.cordon(node_id)
        moved: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for entry in list(self._router.table.entries()):
            if entry.node_id != node_id:
                continue
            rid = entry.id
            spec = self._router.table.spec(rid.collection)
            if spec is None:
                continue  # dropped meanwhile
            to = self._placement.choose_target(spec, rid.shard, rid.replica, node_id)
            if to is None:
                failed.append({"replica": str(rid), "error": "no other node has room for it"})
                continue
            try:
                moved.append(await self.move(rid.collection, rid.shard, rid.replica, to))
            except ColshardError as exc:
                failed.append({"replica": str(rid), "to_node": to, "error": exc.message})
        left = sum(1 for e in self._router.table.entries() if e.node_id == node_id)
        return {
            "node": node_id,
            "cordoned": True,
            "moved": moved,
            "failed": failed,
            "replicas_left": left,
        }

    async def rebalance_once(self) -> dict[str, Any] | None:
        """One step of rebalancing (see the module docstring): when the most loaded shard node
        holds at least two replicas more than the least loaded one, move one ready replica
        from the first to the second (one that has no sibling there). None: balanced, or
        nothing can move now."""
        loads = self._placement.loads()
        if len(loads) < 2:
            return None
        low = min(loads, key=lambda n: (loads[n][0], n))
        count, room = loads[low]
        if room is not None and count >= room:
            return None
        for high in sorted(loads, key=lambda n: (-loads[n][0], n)):
            if loads[high][0] - count < 2:
                return None
            for entry in self._router.table.entries():
                if entry.node_id != high or entry.sync != ReplicaState.READY:
                    continue
                rid = entry.id
                rs = self._router.table.shard_sets(rid.collection)[rid.shard]
                moving = (rid.collection, rid.shard) in self._moving
                if moving or any(r.entry().node_id == low for r in rs.replicas):
                    continue
                try:
                    return await self.move(rid.collection, rid.shard, rid.replica, low)
                except ColshardError as exc:
                    log.warning("rebalancing %s to %s failed: %s", rid, low, exc.message)
                    return None
        return None

    def undrain(self, node_id: str) -> dict[str, Any]:
        """Lift the cordon: new replicas may go to ``node_id`` again."""
        left = self._placement.cordon(node_id, on=False)
        return {"node": node_id, "cordoned": False, "cordoned_nodes": sorted(left)}
