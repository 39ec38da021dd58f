"""Durability under real process kills: the shard host holding the shard (its worker process)
is SIGKILLed in the middle of a continuous import (several kill points); Ray restarts it, it
reopens the shard, which recovers from its WAL and segments, and every acknowledged object
comes back byte-equal."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest

from gateway.client import Client, NamedVector, Property
from tests.integration.conftest import Server
from tests.integration.shards import ShardRef

pytestmark = pytest.mark.integration
DIM = 16


def test_sigkill_shard_worker_during_import(colshard_server: Server) -> None:

    rng = np.random.default_rng(9)
    acked: dict[str, np.ndarray] = {}
    attempted: set[str] = set()
    stop = threading.Event()
    errors: list[str] = []

    with Client(colshard_server.url, timeout_s=120) as client:
        col = client.collections.create(
            "Crash",
            properties=[Property("k", "int")],
            shard_count=1,
            vectors=[NamedVector("v", dim=DIM, kind="multi", metric="dot")],
        )
        shard = ShardRef(colshard_server, "colshard:Crash:0")

        def importer() -> None:
            with Client(colshard_server.url, timeout_s=120) as c:
                k = 0
                while not stop.is_set():
                    batch = []
                    for _ in range(25):
                        oid = str(uuid.uuid4())
                        vec = rng.normal(size=(int(rng.integers(1, 6)), DIM)).astype(np.float32)
                        batch.append((oid, vec))
                        attempted.add(oid)
                        k += 1
                    try:
                        res = c.collections.get("Crash").data.insert_many(
                            [
                                {"id": o, "properties": {"k": k}, "vectors": {"v": v}}
                                for o, v in batch
                            ]
                        )
                    except Exception as exc:  # the whole request failed: nothing acknowledged
                        errors.append(repr(exc))
                        continue
                    for (oid, vec), row in zip(batch, res.results, strict=True):
                        if row["status"] == "SUCCESS":
                            acked[oid] = vec

        thread = threading.Thread(target=importer)
        thread.start()
        try:
            for _ in range(3):  # three kill points
                time.sleep(1.5)
                pid = shard.pid()
                os.kill(pid, signal.SIGKILL)
            time.sleep(2.0)
        finally:
            stop.set()
            thread.join(timeout=180)

        assert len(acked) > 100, (len(acked), errors[:3])
        stored: dict[str, np.ndarray] = {}
        after = None
        while True:
            page = col.query.fetch_objects(limit=500, after=after, include_vector=True)
            stored.update({o.uuid: np.asarray(o.vector["v"], dtype=np.float32) for o in page})
            if len(page) < 500:
                break
            after = page[-1].uuid
        missing = set(acked) - set(stored)
        assert not missing, f"{len(missing)} acknowledged objects lost"
        assert set(stored) <= attempted  # nothing that was never written
        for oid, vec in acked.items():
            assert stored[oid].tobytes() == vec.tobytes()
        client.collections.delete("Crash")
