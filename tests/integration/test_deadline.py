"""A query's deadline stops the shard's work, not just the answer: a heavy exact query with a
short timeout gets its 504, and the shard actor's CPU time (read from /proc) stops growing
within half a second of it."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from cluster.vector_wire import encode
from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

DIM = 96
N_OBJECTS = 30
TOKENS = 5000  # 30 × 5000 tokens: a 4096-token query is ~59 G multiply-adds, seconds of CPU


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, quiet_s: float = 1.0, limit_s: float = 90.0) -> None:
    """Wait until the process uses (almost) no CPU for ``quiet_s`` (merges done)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = cpu_s(pid)
        time.sleep(quiet_s)
        if cpu_s(pid) - before < 0.05 * quiet_s:
            return
    raise AssertionError("the shard never went quiet")


def test_a_deadline_stops_the_shards_work(colshard_server: Server) -> None:
    rng = np.random.default_rng(11)
    with httpx.Client(base_url=colshard_server.url, timeout=120) as http:
        r = http.post(
            "/v1/collections",
            json={
                "name": "Heavy",
                "shard_count": 1,
                "vectors": [{"name": "mv", "dim": DIM, "metric": "dot", "index": {"kind": "flat"}}],
            },
        )
        assert r.status_code == 201, r.text
        try:
            for _ in range(N_OBJECTS // 2):
                objects = [
                    {
                        "id": str(uuid.uuid4()),
                        "vectors": {
                            "mv": encode(rng.standard_normal((TOKENS, DIM)).astype(np.float32))
                        },
                    }
                    for _ in range(2)
                ]
                r = http.post("/v1/collections/Heavy/objects", json={"objects": objects})
                assert r.status_code == 200 and r.json()["n_ok"] == 2, r.text
            info = http.get("/v1/cluster").json()
            (placement,) = info["collections"]["Heavy"]["placements"]
            pid = int(placement["pid"])
            settle(pid)

            query = encode(rng.standard_normal((4096, DIM)).astype(np.float32))
            before = cpu_s(pid)
            start = time.monotonic()
            r = http.post(
                "/v1/collections/Heavy/query",
                json={"near_vector": {"vector": query}, "limit": 3, "timeout": 0.5},
            )
            answered = time.monotonic()
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "deadline_exceeded"
            assert answered - start < 3.0
            time.sleep(max(0.0, answered + 0.5 - time.monotonic()))
            stopped = cpu_s(pid)
            assert stopped - before > 0.2, "the shard never started on the query"
            time.sleep(1.5)
            # Without the shard-side deadline it went on for seconds (the whole exact scan).
            assert cpu_s(pid) - stopped < 0.15, "the shard kept working after the 504"

            # The same query with time enough still answers (nothing was left broken).
            r = http.post(
                "/v1/collections/Heavy/query",
                json={
                    "near_vector": {
                        "vector": encode(rng.standard_normal((8, DIM)).astype(np.float32))
                    },
                    "limit": 3,
                },
            )
            assert r.status_code == 200 and len(r.json()["objects"]) == 3, r.text
        finally:
            http.delete("/v1/collections/Heavy")
