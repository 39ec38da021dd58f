"""Coordinator metric labels and outcomes (the Ray export: tests/integration/test_metrics.py)."""

from __future__ import annotations

from cluster.errors import DeadlineExceeded, InvalidInput
from cluster.types import WriteResult
from coordinator.metrics import CoordinatorMetrics, collection_label, outcome


def test_collection_label_bounds_client_text() -> None:
    assert collection_label("Articles_2") == "Articles_2"
    for bad in ("²", "", "a b", "x" * 65, "1abc"):
        assert collection_label(bad) == "_invalid"


def test_outcome_is_the_error_code() -> None:
    assert outcome(None) == "ok"
    assert outcome(InvalidInput("bad")) == "invalid_input"
    assert outcome(DeadlineExceeded("slow")) == "deadline_exceeded"
    assert outcome(RuntimeError("boom")) == "internal"


def test_recording_never_raises() -> None:
    m = CoordinatorMetrics()  # with or without a Ray worker around
    m.record_query("²", "near_vector", 0.1, None, missing_shards=1)
    m.record_writes("C", [WriteResult("a", True)], None, 1)
    m.record_writes("C", None, InvalidInput("x"), 3)
