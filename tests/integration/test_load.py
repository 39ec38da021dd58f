"""A bounded load test (bench/loadtest.py) against a real gateway, coordinator and shard
actors: concurrent clients mixing imports and queries for COLSHARD_LOAD_SECONDS (default 30),
no errors, p50/p99 reported, and the RSS of every colshard process (gateway, coordinator actor
worker, shard actor workers) flat after the warm-up. A longer run is one command:
``colshard load --url URL --duration-s 600`` against ``colshard serve``."""

from __future__ import annotations

import json
import os
import signal

import anyio
import pytest

from bench.loadtest import LoadConfig, run_load
from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

DURATION_S = float(os.environ.get("COLSHARD_LOAD_SECONDS", "30"))
# Generous: allocator high-water marks and Ray's own buffers move a little; a leak proportional
# to the requests served (thousands of them) would move far more.
MAX_GROWTH_MB = float(os.environ.get("COLSHARD_LOAD_MAX_GROWTH_MB", "150"))


def test_mixed_load_has_no_errors_and_no_leak(colshard_server: Server) -> None:
    cfg = LoadConfig(
        url=colshard_server.url,
        duration_s=DURATION_S,
        warmup_s=min(10.0, DURATION_S / 3),
        clients=6,
        write_fraction=0.3,
        dim=32,
        batch_size=16,
        id_pool=800,
        shard_count=2,
        gateway_pids=(os.getpid(),),
    )
    report = anyio.run(run_load, cfg)
    print("\n" + report.format())
    assert report.errors == 0, report.error_samples
    assert report.requests >= 100 and {"import", "near_vector", "bm25", "get"} <= set(report.ops)
    assert report.p99_ms >= report.p50_ms > 0
    labels = {m.label for m in report.memory}
    assert "gateway" in labels and "coordinator" in labels, labels
    assert sum(1 for m in report.memory if m.label.startswith("colshard:Load_")) == 2, labels
    for mem in report.memory:
        assert mem.samples >= 3, mem
        assert mem.growth_after_warmup_mb < MAX_GROWTH_MB, report.format()


def test_load_command(
    colshard_server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`colshard load` is the same driver behind one command (a few seconds here)."""
    from gateway.cli import main

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main() sets a SIGTERM handler
    rc = main(
        [
            "load",
            "--url",
            colshard_server.url,
            "--duration-s",
            "4",
            "--warmup-s",
            "1",
            "--clients",
            "2",
            "--pid",
            str(os.getpid()),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["errors"] == 0, report["error_samples"]
    assert report["requests"] > 0 and report["p99_ms"] >= report["p50_ms"]
    assert {m["label"] for m in report["memory"]} >= {"gateway", "coordinator"}
    assert all("growth_after_warmup_mb" in m for m in report["memory"])
