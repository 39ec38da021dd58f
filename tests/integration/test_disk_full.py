"""A full disk under a running server: the shard's data dir is on a small tmpfs (skipped where
tmpfs cannot be mounted), filled up by another file. Writes are refused with 507
``insufficient_storage`` (per object in a batch, typed in the SDK), reads and queries go on,
nothing acknowledged is lost; once space is freed writes succeed again, and a shard worker
killed afterwards recovers exactly the acknowledged objects from its WAL."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from cluster.errors import InsufficientStorage
from cluster.settings import ShardSettings
from gateway.client import Client
from tests.integration.conftest import start_server, stop_server
from tests.integration.shards import ShardRef

pytestmark = pytest.mark.integration
DIM = 16
COLLECTION = "Full"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        for _ in range(50):  # the killed actor's files may be closed a moment later
            if (
                subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode
                == 0
            ):
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1 << 9):
            block = b"\xff" * chunk
            with contextlib.suppress(OSError):
                while True:
                    f.write(block)
        with pytest.raises(OSError) as info:
            f.write(b"\xff" * 512)
        assert info.value.errno == errno.ENOSPC


def objects_body(objs: dict[str, np.ndarray]) -> dict[str, object]:
    return {
        "objects": [
            {"id": o, "properties": {"k": i}, "vectors": {"v": v.tolist()}}
            for i, (o, v) in enumerate(objs.items())
        ]
    }


def stored(http: httpx.Client) -> dict[str, np.ndarray]:
    r = http.get(
        f"/v1/collections/{COLLECTION}/objects", params={"limit": 1000, "include_vector": "true"}
    )
    assert r.status_code == 200, r.text
    return {o["id"]: np.asarray(o["vectors"]["v"], dtype=np.float32) for o in r.json()["objects"]}


def test_disk_full_refuses_writes_and_loses_nothing(
    etcd_endpoint: str, ray_session: None, small_fs: Path
) -> None:

    rng = np.random.default_rng(4)

    def new_objects(n: int, rows: int) -> dict[str, np.ndarray]:
        return {
            str(uuid.uuid4()): rng.normal(size=(rows, DIM)).astype(np.float32) for _ in range(n)
        }

    srv, running = start_server(
        etcd_endpoint, small_fs / "data", ShardSettings(seal_threshold_tokens=1_000_000)
    )
    acked: dict[str, np.ndarray] = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            r = http.post(
                "/v1/collections",
                json={
                    "name": COLLECTION,
                    "properties": [{"name": "k", "data_type": "int"}],
                    "vectors": [{"name": "v", "kind": "multi", "dim": DIM, "metric": "dot"}],
                    "shard_count": 1,
                },
            )
            assert r.status_code == 201, r.text
            first = new_objects(40, 8)
            r = http.post(f"/v1/collections/{COLLECTION}/objects", json=objects_body(first))
            assert r.json()["n_ok"] == 40
            acked.update(first)

            filler = small_fs / "filler"
            fill(filler)
            # A replace needing new pages (256 rows: 16 KiB) is refused, clearly.
            oid, big = str(uuid.uuid4()), rng.normal(size=(256, DIM)).astype(np.float32)
            r = http.put(
                f"/v1/collections/{COLLECTION}/objects/{oid}",
                json={"properties": {"k": 1}, "vectors": {"v": big.tolist()}},
            )
            assert r.status_code == 507, r.text
            err = r.json()["error"]
            assert err["code"] == "insufficient_storage"
            assert "insufficient storage" in err["message"] and "retry" in err["message"]
            assert err["details"]["errno"] == errno.ENOSPC
            # A batch: every object FAILED with the same code, nothing written.
            refused = new_objects(10, 64)
            r = http.post(f"/v1/collections/{COLLECTION}/objects", json=objects_body(refused))
            assert r.status_code == 200, r.text
            assert r.json()["n_ok"] == 0
            assert {row["error"]["code"] for row in r.json()["results"]} == {"insufficient_storage"}
            refused[oid] = big
            # The SDK raises the typed error.
            with Client(srv.url, timeout_s=120) as client, pytest.raises(InsufficientStorage):
                client.collections.get(COLLECTION).data.insert(
                    {"k": 2}, vector={"v": rng.normal(size=(256, DIM)).tolist()}
                )
            # Reads and queries still work, and see exactly the acknowledged objects.
            assert stored(http).keys() == acked.keys()
            r = http.post(
                f"/v1/collections/{COLLECTION}/query",
                json={"near_vector": {"vector": first[next(iter(first))][:2].tolist()}, "limit": 5},
            )
            assert r.status_code == 200 and len(r.json()["objects"]) == 5

            filler.unlink()  # space is back
            more = new_objects(20, 64)
            r = http.post(f"/v1/collections/{COLLECTION}/objects", json=objects_body(more))
            assert r.json()["n_ok"] == 20, r.text
            acked.update(more)
            r = http.put(
                f"/v1/collections/{COLLECTION}/objects/{oid}",
                json={"properties": {"k": 1}, "vectors": {"v": big.tolist()}},
            )
            assert r.status_code == 200, r.text
            acked[oid] = big
            gone = next(iter(first))
            assert http.delete(f"/v1/collections/{COLLECTION}/objects/{gone}").status_code == 200
            del acked[gone]

            # The shard's host dies; Ray restarts it and the shard replays its WAL from the
            # tmpfs.
            shard = ShardRef(srv, f"colshard:{COLLECTION}:0")
            pid = shard.call("ready", timeout_s=120)["pid"]
            os.kill(pid, signal.SIGKILL)
            shard.ready_after_restart(pid)
            got = stored(http)
            assert got.keys() == acked.keys()
            assert not got.keys() & (refused.keys() - acked.keys())
            for o, vec in acked.items():
                assert got[o].tobytes() == vec.tobytes(), o
            http.delete(f"/v1/collections/{COLLECTION}")
    finally:
        stop_server(srv, running)
