"""The move and drain routes on one node: every refusal is a clear 4xx that changes nothing
(the moves themselves run on two nodes in ``test_multinode.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Server

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MOVE_CLI = [sys.executable, "-m", "gateway.cli", "move", "MoveNo", "0", "--to", "nope"]


def test_move_and_drain_refusals(colshard_server: Server) -> None:
    with httpx.Client(base_url=colshard_server.url, timeout=60) as http:
        r = http.post(
            "/v1/collections",
            json={"name": "MoveNo", "vectors": [{"name": "v", "dim": 4}], "shard_count": 1},
        )
        assert r.status_code == 201, r.text
        (before,) = http.get("/v1/cluster").json()["collections"]["MoveNo"]["placements"]
        here = before["node_id"]
        cases = [
            ("/v1/collections/MoveNo/shards/0/move", {"to_node": "nope"}, 422, "not an alive"),
            ("/v1/collections/MoveNo/shards/0/move", {"to_node": here}, 422, "already"),
            ("/v1/collections/MoveNo/shards/3/move", {"to_node": here}, 404, "no shard 3"),
            (
                "/v1/collections/MoveNo/shards/0/move",
                {"to_node": "x", "replica": 2},
                422,
                "no replica 2",
            ),
            ("/v1/collections/MoveNo/shards/0/move", {}, 422, "to_node"),
            ("/v1/collections/Nope/shards/0/move", {"to_node": "x"}, 404, "Nope"),
            ("/v1/cluster/nodes/nope/drain", None, 404, "nope"),
        ]
        for path, body, status, text in cases:
            r = http.post(path, json=body) if body is not None else http.post(path)
            assert r.status_code == status and text in r.text, (path, body, r.text)
        (after,) = http.get("/v1/cluster").json()["collections"]["MoveNo"]["placements"]
        assert after["node_id"] == here and after["state"] == "ready"
        cli = subprocess.run(
            [*MOVE_CLI, "--url", colshard_server.url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert cli.returncode == 1 and "not an alive node" in cli.stdout + cli.stderr
        assert http.delete("/v1/collections/MoveNo").status_code == 200
