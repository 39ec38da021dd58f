"""Metrics a colshard cluster exports through ``ray.util.metrics``: after imports and queries
over real HTTP, the Ray node's Prometheus endpoint serves the coordinator's query latency (by
collection, query kind and outcome) and objects-written counters, and the shards' search
latency, candidates, imported tokens and size gauges."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import numpy as np
import pytest

from tests.integration.conftest import Server

pytestmark = pytest.mark.integration
DIM = 8


def _scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return ""


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_coordinator_and_shard_metrics_reach_prometheus(colshard_server: Server) -> None:
    import ray

    rng = np.random.default_rng(5)
    name = "Metrics"
    with httpx.Client(base_url=colshard_server.url, timeout=60) as http:
        r = http.post(
            "/v1/collections",
            json={"name": name, "vectors": [{"name": "v", "dim": DIM}], "shard_count": 2},
        )
        assert r.status_code == 201, r.text
        objects = [
            {"id": str(uuid.uuid4()), "vectors": {"v": rng.normal(size=(3, DIM)).tolist()}}
            for _ in range(50)
        ]
        assert (
            http.post(f"/v1/collections/{name}/objects", json={"objects": objects}).json()["n_ok"]
            == 50
        )
        for _ in range(5):
            r = http.post(
                f"/v1/collections/{name}/query",
                json={"near_vector": {"vector": rng.normal(size=(4, DIM)).tolist()}},
            )
            assert r.status_code == 200, r.text
        # A failing query is counted under its error code.
        r = http.post(
            f"/v1/collections/{name}/query", json={"near_vector": {"vector": [[1.0] * (DIM + 1)]}}
        )
        assert r.status_code == 422
        # Requests naming an invalid (non-ASCII) collection are counted, never a 500.
        oid = str(uuid.uuid4())
        r = http.put(f"/v1/collections/%C2%B2/objects/{oid}", json={})
        assert r.status_code == 422, r.text
        r = http.post("/v1/collections/%C2%B2/query", json={"near_vector": {"vector": [[1.0]]}})
        assert r.status_code == 422, r.text
        # No stats call here: the size gauges come from each shard's periodic refresh.

        port = ray.nodes()[0]["MetricsExportPort"]
        wanted = {
            "ray_colshard_coordinator_query_seconds_count": {
                "collection": name,
                "kind": "near_vector",
                "outcome": "ok",
            },
            "ray_colshard_coordinator_objects_written_total": {"collection": name, "outcome": "ok"},
            "ray_colshard_shard_search_seconds_count": {"collection": name},
            "ray_colshard_shard_imported_tokens_total": {"collection": name},
            "ray_colshard_shard_objects": {"collection": name},
        }
        deadline = time.time() + 90  # Ray reports metrics every few seconds
        text = ""
        while time.time() < deadline:
            text = _scrape(port)
            # Each shard refreshes its own size gauges on its own period: wait until both
            # have reported the import, not just the first to come.
            if (
                all(_sample(text, m, **labels) is not None for m, labels in wanted.items())
                and sum(
                    _sample(text, "ray_colshard_shard_objects", collection=name, shard=str(s)) or 0
                    for s in range(2)
                )
                >= 50
            ):
                break
            time.sleep(2)
        missing = [m for m, labels in wanted.items() if _sample(text, m, **labels) is None]
        assert not missing, (missing, [ln for ln in text.splitlines() if "colshard" in ln][:40])
        assert (
            _sample(
                text,
                "ray_colshard_coordinator_query_seconds_count",
                collection=name,
                kind="near_vector",
                outcome="ok",
            )
            == 5
        )
        assert (
            _sample(
                text,
                "ray_colshard_coordinator_objects_written_total",
                collection=name,
                outcome="ok",
            )
            == 50
        )
        shards_total = sum(
            _sample(text, "ray_colshard_shard_objects", collection=name, shard=str(s)) or 0
            for s in range(2)
        )
        assert shards_total == 50
        assert http.delete(f"/v1/collections/{name}").status_code == 200
