"""Replace, patch and delete under concurrent queries, over real HTTP against a real gateway,
coordinator and shard actors (which seal and compact in the background meanwhile).

Every object ``key`` carries properties ``ver`` (bumped by every write to it; a delete bumps it
too) and ``vver`` (the ``ver`` that last wrote its vector), and its vector is a pure function of
``(key, vver)`` whose first row is ``10 * e_key``: a query ``[e_key]`` scores that object 10 and
every other object 0. Each object has one writer thread, so its versions are monotonic. Query
threads check every hit against the state acknowledged before the query was sent:

* a hit is internally consistent (its vector is the one of its ``(key, vver)``);
* never a version older than the last acknowledged write, never an object whose delete was
  acknowledged (unless re-created later), never a version from the future;
* an object that was live and untouched for the whole query is found (top hit, score 10); one
  that was deleted and untouched for the whole query is not.

At the end the stored objects equal the acknowledged state exactly.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.conftest import Server

pytestmark = pytest.mark.integration
N_OBJECTS = 40
DIM = N_OBJECTS + 8
N_WRITERS = 3
N_QUERIERS = 2
RUN_S = 10.0
COLLECTION = "Concurrent"


def vector_for(key: int, vver: int) -> np.ndarray:
    rng = np.random.default_rng([key, vver])
    rows = int(rng.integers(24, 41))  # ~30 tokens a write: several seals and compactions
    m = np.zeros((rows + 1, DIM), dtype=np.float32)
    m[0, key] = 10.0
    m[1:, N_OBJECTS:] = rng.normal(size=(rows, DIM - N_OBJECTS))
    return m


@dataclass(frozen=True)
class Acked:
    ver: int
    deleted: bool
    vver: int


class World:
    """The acknowledged state of every object, and which objects have a write in flight."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.lock = threading.Lock()
        self.acked = {k: Acked(0, False, 0) for k in range(len(ids))}
        self.busy = dict.fromkeys(range(len(ids)), False)

    def snapshot(self) -> tuple[dict[int, Acked], dict[int, bool]]:
        with self.lock:
            return dict(self.acked), dict(self.busy)


def _body(key: int, ver: int, vver: int) -> dict[str, Any]:
    return {
        "properties": {"key": key, "ver": ver, "vver": vver},
        "vectors": {"v": vector_for(key, vver).tolist()},
    }


def writer(
    url: str, world: World, w: int, stop: threading.Event, errors: list[str], counts: dict[str, int]
) -> None:
    rng = np.random.default_rng(100 + w)
    mine = [k for k in world.acked if k % N_WRITERS == w]
    base = f"/v1/collections/{COLLECTION}/objects"
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            key = mine[int(rng.integers(len(mine)))]
            oid = world.ids[key]
            with world.lock:
                cur = world.acked[key]
                world.busy[key] = True
            ver = cur.ver + 1
            r_op = float(rng.random())
            try:
                if cur.deleted or r_op < 0.35:
                    op, new = "put", Acked(ver, False, ver)
                    r = http.put(f"{base}/{oid}", json=_body(key, ver, ver))
                elif r_op < 0.55:
                    op, new = "patch_props", Acked(ver, False, cur.vver)
                    r = http.patch(f"{base}/{oid}", json={"properties": {"ver": ver}})
                elif r_op < 0.75:
                    op, new = "patch_vector", Acked(ver, False, ver)
                    r = http.patch(
                        f"{base}/{oid}",
                        json={
                            "properties": {"ver": ver, "vver": ver},
                            "vectors": {"v": vector_for(key, ver).tolist()},
                        },
                    )
                else:
                    op, new = "delete", Acked(ver, True, cur.vver)
                    r = http.delete(f"{base}/{oid}")
            except httpx.HTTPError as exc:
                errors.append(f"writer {w}: {exc!r}")
                return
            if r.status_code != 200:
                errors.append(f"writer {w}: {op} {key} -> {r.status_code} {r.text[:300]}")
                return
            with world.lock:
                world.acked[key] = new
                world.busy[key] = False
                counts[op] = counts.get(op, 0) + 1


def check_hits(
    world: World, before: dict[int, Acked], after: dict[int, Acked], hits: list[dict[str, Any]]
) -> list[str]:
    problems = []
    for h in hits:
        props = h["properties"]
        key, ver, vver = int(props["key"]), int(props["ver"]), int(props["vver"])
        if h["id"] != world.ids[key]:
            problems.append(f"hit {h['id']} carries key {key}")
            continue
        got = np.asarray(h["vectors"]["v"], dtype=np.float32)
        want = vector_for(key, vver)
        if got.shape != want.shape or got.tobytes() != want.tobytes():
            problems.append(f"object {key} v{ver}: vector is not the one of vver {vver}")
        floor = before[key]
        if ver < floor.ver or (floor.deleted and ver <= floor.ver):
            problems.append(
                f"object {key}: returned v{ver} after "
                f"{'delete' if floor.deleted else 'write'} v{floor.ver} was acked"
            )
        if ver > after[key].ver + 1:
            problems.append(f"object {key}: v{ver} was never written (acked v{after[key].ver})")
    return problems


def querier(
    url: str, world: World, q: int, stop: threading.Event, errors: list[str], stats: dict[str, int]
) -> None:
    rng = np.random.default_rng(200 + q)
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            key = int(rng.integers(N_OBJECTS))
            query = np.zeros((1, DIM), dtype=np.float32)
            query[0, key] = 1.0
            before, busy_before = world.snapshot()
            try:
                r = http.post(
                    f"/v1/collections/{COLLECTION}/query",
                    json={
                        "near_vector": {"vector": query.tolist()},
                        "limit": 3,
                        "include_vector": True,
                        "return_metadata": ["score"],
                    },
                )
            except httpx.HTTPError as exc:
                errors.append(f"query: {exc!r}")
                return
            after, busy_after = world.snapshot()
            if r.status_code != 200:
                errors.append(f"query -> {r.status_code} {r.text[:300]}")
                return
            hits = r.json()["objects"]
            errors.extend(check_hits(world, before, after, hits))
            stable = before[key] == after[key] and not busy_before[key] and not busy_after[key]
            ids = [h["id"] for h in hits]
            if stable and not before[key].deleted:
                stats["stable_live"] += 1
                if (
                    not ids
                    or ids[0] != world.ids[key]
                    or abs(hits[0]["metadata"]["score"] - 10.0) > 1e-3
                ):
                    errors.append(f"object {key} (live, untouched) not the top hit: {hits[:1]}")
            elif stable:
                stats["stable_deleted"] += 1
                if world.ids[key] in ids:
                    errors.append(f"object {key} (deleted, untouched) returned")
            stats["queries"] += 1


def test_updates_and_deletes_under_concurrent_queries(colshard_server: Server) -> None:
    url = colshard_server.url
    id_rng = np.random.default_rng(3)  # random ids: spread over both shards
    ids = [str(uuid.UUID(bytes=id_rng.bytes(16), version=4)) for _ in range(N_OBJECTS)]
    world = World(ids)
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post(
            "/v1/collections",
            json={
                "name": COLLECTION,
                "properties": [{"name": n, "data_type": "int"} for n in ("key", "ver", "vver")],
                "vectors": [{"name": "v", "kind": "multi", "dim": DIM, "metric": "dot"}],
                "shard_count": 2,
            },
        )
        assert r.status_code == 201, r.text
        r = http.post(
            f"/v1/collections/{COLLECTION}/objects",
            json={"objects": [{"id": oid, **_body(k, 0, 0)} for k, oid in enumerate(ids)]},
        )
        assert r.status_code == 200 and r.json()["n_ok"] == N_OBJECTS, r.text

    stop = threading.Event()
    errors: list[str] = []
    counts: dict[str, int] = {}
    stats = {"queries": 0, "stable_live": 0, "stable_deleted": 0}
    threads = [
        threading.Thread(target=writer, args=(url, world, w, stop, errors, counts))
        for w in range(N_WRITERS)
    ]
    threads += [
        threading.Thread(target=querier, args=(url, world, q, stop, errors, stats))
        for q in range(N_QUERIERS)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline and not errors:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]
    assert stats["queries"] >= 50 and stats["stable_live"] >= 20, stats
    assert all(counts.get(op, 0) >= 5 for op in ("put", "patch_props", "patch_vector", "delete")), (
        counts
    )

    # Final state: exactly the acknowledged one.
    final, busy = world.snapshot()
    assert not any(busy.values())
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.get(
            f"/v1/collections/{COLLECTION}/objects",
            params={"limit": 1000, "include_vector": "true"},
        )
        stored = {o["id"]: o for o in r.json()["objects"]}
        live = {k for k, a in final.items() if not a.deleted}
        assert set(stored) == {ids[k] for k in live}
        for k in live:
            o = stored[ids[k]]
            assert o["properties"] == {"key": k, "ver": final[k].ver, "vver": final[k].vver}
            got = np.asarray(o["vectors"]["v"], dtype=np.float32)
            assert got.tobytes() == vector_for(k, final[k].vver).tobytes()
        for k in range(N_OBJECTS):
            query = np.zeros((1, DIM), dtype=np.float32)
            query[0, k] = 1.0
            r = http.post(
                f"/v1/collections/{COLLECTION}/query",
                json={"near_vector": {"vector": query.tolist()}, "limit": 3},
            )
            top = [h["id"] for h in r.json()["objects"]]
            if k in live:
                assert top[0] == ids[k]
            else:
                assert ids[k] not in top
        described = http.get(f"/v1/collections/{COLLECTION}").json()
        http.delete(f"/v1/collections/{COLLECTION}")
    shards = [
        (s["shard"], s["stats"]["n_objects"], s["stats"]["index_state"])
        for s in described["shards"]
    ]
    assert all(n > 0 for _, n, _ in shards), shards
    print(f"\n{stats} writes {counts}; shards: {shards}")
