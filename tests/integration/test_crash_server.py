"""Durability under a whole-server crash: ``colshard serve`` (gateway, coordinator, shard
workers, raylet, GCS, etcd: every process it started) is SIGKILLed at once in the middle of a
continuous import with replaces and deletes, at several kill points, and restarted on the same
data dir each time. After every restart the stored objects are exactly the acknowledged state
(ids, properties and vectors byte-equal); the one request in flight at the kill may have landed
or not, but only whole."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cluster.embedded_etcd import find_free_ports
from tests.integration.conftest import (
    kill_serve_hard,
    port_open,
    server_processes,
    start_serve,
    stop_serve,
    wait_ports_closed,
    wait_processes_gone,
)

pytestmark = pytest.mark.integration
DIM = 16
COLLECTION = "Crash"
KILL_AFTER_S = (0.6, 1.5, 2.5)  # after the round's first acknowledged write
# A small growing segment, so the kills also land around seals (segment files, manifest and
# WAL truncation), not only between WAL appends.
SERVE_ARGS = ("--seal-threshold-tokens", "128")

# An object's state: (property k, vector) or None for "absent".
State = tuple[int, np.ndarray] | None


def _same(a: State, b: State) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a[0] == b[0] and a[1].shape == b[1].shape and a[1].tobytes() == b[1].tobytes()


@dataclass
class Model:
    """What the client was told (``acked``) and what the request in flight might have done."""

    acked: dict[str, State] = field(default_factory=dict)
    maybe: dict[str, list[State]] = field(default_factory=dict)
    n_acked_ops: int = 0
    k: int = 0

    def live(self) -> list[str]:
        return [o for o, s in self.acked.items() if s is not None and o not in self.maybe]


class Importer(threading.Thread):
    """One client thread: batches of new objects, single-object replaces (PUT) and deletes,
    each recorded as acknowledged only after a success response."""

    def __init__(self, url: str, model: Model, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.model = url, model
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.failures: list[str] = []

    def _vec(self) -> np.ndarray:
        return self.rng.normal(size=(int(self.rng.integers(1, 7)), DIM)).astype(np.float32)

    def run(self) -> None:
        m = self.model
        with httpx.Client(base_url=self.url, timeout=60) as http:
            step = 0
            while not self.stop.is_set():
                step += 1
                live = m.live()
                if step % 4 == 0 and live:
                    self._do_delete(http, live[int(self.rng.integers(len(live)))])
                elif step % 3 == 0 and live:
                    self._do_replace(http, live[int(self.rng.integers(len(live)))])
                else:
                    self._do_insert(http)
                if m.maybe:  # an unknown outcome: the server is (being) killed
                    return

    def _next_k(self) -> int:
        self.model.k += 1
        return self.model.k

    def _do_insert(self, http: httpx.Client) -> None:
        new = {str(uuid.uuid4()): (self._next_k(), self._vec()) for _ in range(20)}
        body = {
            "objects": [
                {"id": o, "properties": {"k": k}, "vectors": {"v": v.tolist()}}
                for o, (k, v) in new.items()
            ]
        }
        try:
            r = http.post(f"/v1/collections/{COLLECTION}/objects", json=body)
            rows = r.json()["results"] if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            rows = None
            self.failures.append(repr(exc))
        if rows is None:
            for o, st in new.items():
                self.model.maybe[o] = [st]
            return
        for row in rows:
            if row["status"] == "SUCCESS":
                self.model.acked[row["id"]] = new[row["id"]]
            else:
                self.model.maybe[row["id"]] = [new[row["id"]]]
        self.model.n_acked_ops += 1

    def _do_replace(self, http: httpx.Client, oid: str) -> None:
        st = (self._next_k(), self._vec())
        try:
            r = http.put(
                f"/v1/collections/{COLLECTION}/objects/{oid}",
                json={"properties": {"k": st[0]}, "vectors": {"v": st[1].tolist()}},
            )
            ok = r.status_code == 200
        except httpx.HTTPError as exc:
            ok = False
            self.failures.append(repr(exc))
        if ok:
            self.model.acked[oid] = st
            self.model.n_acked_ops += 1
        else:
            self.model.maybe[oid] = [st]

    def _do_delete(self, http: httpx.Client, oid: str) -> None:
        try:
            ok = http.delete(f"/v1/collections/{COLLECTION}/objects/{oid}").status_code == 200
        except httpx.HTTPError as exc:
            ok = False
            self.failures.append(repr(exc))
        if ok:
            self.model.acked[oid] = None
            self.model.n_acked_ops += 1
        else:
            self.model.maybe[oid] = [None]


def _stored(http: httpx.Client) -> dict[str, State]:
    out: dict[str, State] = {}
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500, "include_vector": "true"}
        if after:
            params["after"] = after
        r = http.get(f"/v1/collections/{COLLECTION}/objects", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        for o in page["objects"]:
            out[o["id"]] = (
                int(o["properties"]["k"]),
                np.asarray(o["vectors"]["v"], dtype=np.float32),
            )
        after = page["next_after"]
        if not after:
            return out


def _check_and_resolve(model: Model, stored: dict[str, State]) -> int:
    """Stored == acknowledged, except that ids touched by the request in flight may hold any
    of their allowed states. Resolves those to what is stored; returns how many landed."""
    unknown = set(stored) - set(model.acked) - set(model.maybe)
    assert not unknown, f"{len(unknown)} objects that were never written"
    landed = 0
    for oid in set(model.acked) | set(model.maybe):
        got = stored.get(oid)
        allowed = [model.acked.get(oid), *model.maybe.get(oid, [])]
        assert any(_same(got, a) for a in allowed), (
            f"object {oid}: stored {'absent' if got is None else got[0]}, acknowledged "
            f"{'absent' if model.acked.get(oid) is None else model.acked[oid][0]}"  # type: ignore[index]
            f"{' (write in flight at the kill)' if oid in model.maybe else ''}"
        )
        if oid in model.maybe and not _same(got, model.acked.get(oid)):
            landed += 1
        model.acked[oid] = got
    model.maybe.clear()
    return landed


def test_sigkill_whole_server_during_import_keeps_exactly_the_acknowledged(tmp_path: Path) -> None:
    port, etcd_port = find_free_ports(2)
    data_dir = tmp_path / "data"
    log = tmp_path / "serve.log"
    ray_tmp = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))  # short: Ray's socket paths
    markers = [str(data_dir), str(ray_tmp)]
    url = f"http://127.0.0.1:{port}"
    model = Model()
    report: list[str] = []
    t_start = time.monotonic()
    proc = start_serve(data_dir, port, etcd_port, log, ray_tmp=ray_tmp, extra_args=SERVE_ARGS)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post(
                "/v1/collections",
                json={
                    "name": COLLECTION,
                    "properties": [{"name": "k", "data_type": "int"}],
                    "vectors": [{"name": "v", "kind": "multi", "dim": DIM, "metric": "dot"}],
                    "shard_count": 2,
                },
            )
            assert r.status_code == 201, r.text

        for round_no, delay in enumerate(KILL_AFTER_S):
            importer = Importer(url, model, seed=round_no)
            acked_before = model.n_acked_ops
            importer.start()
            deadline = time.monotonic() + 60
            while model.n_acked_ops == acked_before:
                assert time.monotonic() < deadline, importer.failures[:3]
                assert importer.is_alive(), importer.failures[:3]
                time.sleep(0.02)
            time.sleep(delay)
            killed = kill_serve_hard(proc, markers)
            importer.stop.set()
            importer.join(timeout=120)
            assert not importer.is_alive()
            assert len(killed) >= 6, killed  # gateway, etcd, GCS, raylet, workers, ...
            assert not server_processes(proc.pid, markers)
            wait_ports_closed([port, etcd_port, etcd_port + 1])
            n_ops = model.n_acked_ops - acked_before
            n_inflight = len(model.maybe)

            t0 = time.monotonic()
            proc = start_serve(
                data_dir, port, etcd_port, log, ray_tmp=ray_tmp, extra_args=SERVE_ARGS
            )
            t_up = time.monotonic() - t0
            with httpx.Client(base_url=url, timeout=60) as http:
                landed = _check_and_resolve(model, _stored(http))
                live = [o for o, s in model.acked.items() if s is not None]
                report.append(
                    f"round {round_no}: killed {len(killed)} processes after "
                    f"{n_ops} acknowledged writes; {n_inflight} ids in flight, "
                    f"{landed} landed; {len(live)} live objects; restart {t_up:.1f}s, "
                    f"check {time.monotonic() - t0 - t_up:.1f}s"
                )
                # The restarted server also serves queries over what it recovered.
                q = model.acked[live[0]][1][:2]  # type: ignore[index]
                r = http.post(
                    f"/v1/collections/{COLLECTION}/query",
                    json={"near_vector": {"vector": q.tolist()}, "limit": 5},
                )
                assert r.status_code == 200, r.text
                assert {o["id"] for o in r.json()["objects"]} <= set(live)
        assert sum(1 for s in model.acked.values() if s is None) > 0  # deletes were exercised
        assert len([s for s in model.acked.values() if s is not None]) > 100
        sealed = list(data_dir.glob(f"{COLLECTION}/*/segments/seg-*"))
        report.append(f"{len(sealed)} sealed segments on disk")
        assert sealed, "no segment was sealed: the kills never met a seal"
    finally:
        code = stop_serve(proc) if proc.poll() is None else None
        leftovers = wait_processes_gone(proc.pid, markers)  # Ctrl-C stops all it started
        if leftovers:
            kill_serve_hard(proc, markers)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 0
    assert not leftovers
    assert not port_open(port) and not port_open(etcd_port)
    print("\n".join(report), f"\ntotal {time.monotonic() - t_start:.1f}s")
