"""Shared helpers for the shard engine tests (no tests of its own besides a self-check)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.settings import ShardSettings
from cluster.spec import CollectionSpec
from cluster.types import ObjectBatch, VectorColumn
from shard.engine import ShardEngine
from shard.maxsim import maxsim_reference


def uid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012x}"


def make_spec(
    vectors: Sequence[Mapping[str, Any]] | None = None,
    properties: Sequence[Mapping[str, Any]] | None = None,
) -> CollectionSpec:
    vecs = list(vectors or [{"name": "v", "kind": "multi", "dim": 8, "metric": "dot"}])
    props = list(
        properties or [{"name": "title", "data_type": "text"}, {"name": "n", "data_type": "int"}]
    )
    return CollectionSpec.from_dict(
        {"name": "Test", "properties": props, "vectors": vecs, "shard_count": 1}
    )


def settings(**kw: Any) -> ShardSettings:
    base: dict[str, Any] = {
        "seal_threshold_tokens": 1_000_000,
        "brute_force_max_tokens": 1_000_000,
        "candidates_per_token": 32,
        "fsync": False,
        "seal_idle_s": 0.0,
    }  # idle sealing/merging: only where a test asks
    base.update(kw)
    return ShardSettings(**base)


def batch(
    ids: Sequence[int],
    vectors: Mapping[str, Sequence[np.ndarray | None]],
    props: Sequence[Mapping[str, Any]] | None = None,
) -> ObjectBatch:
    dims = {name: next(m.shape[1] for m in ms if m is not None) for name, ms in vectors.items()}
    return ObjectBatch(
        tuple(uid(i) for i in ids),
        tuple(props if props is not None else ({"title": f"doc {i}", "n": i} for i in ids)),
        {name: VectorColumn.from_matrices(list(ms), dims[name]) for name, ms in vectors.items()},
    )


def random_docs(
    rng: np.random.Generator, n: int, dim: int, lo: int = 1, hi: int = 8, normalise: bool = False
) -> list[np.ndarray]:
    docs = []
    for _ in range(n):
        m = rng.standard_normal((int(rng.integers(lo, hi + 1)), dim)).astype(np.float32)
        if normalise:
            m /= np.linalg.norm(m, axis=1, keepdims=True)
        docs.append(m)
    return docs


def clustered_docs(
    rng: np.random.Generator, n: int, dim: int, min_len: int = 8
) -> list[np.ndarray]:
    """``n`` unit-norm documents of ``min_len``–24 tokens, each drawn around 3 of 200 random
    topic centres (noise 0.35): token-ANN data with real neighbourhoods."""
    centers = rng.standard_normal((200, dim)).astype(np.float32)
    docs = []
    for _ in range(n):
        topics = rng.integers(0, 200, 3)
        m = int(rng.integers(min_len, 25))
        t = centers[rng.choice(topics, m)] + 0.35 * rng.standard_normal((m, dim)).astype(np.float32)
        docs.append((t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32))
    return docs


def noisy_query(rng: np.random.Generator, doc: np.ndarray) -> np.ndarray:
    """8 of ``doc``'s tokens (all when it has fewer) plus noise 0.3, unit-norm."""
    q = doc[rng.choice(len(doc), min(8, len(doc)), replace=False)]
    q = q + 0.3 * rng.standard_normal(q.shape).astype(np.float32)
    out: np.ndarray = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return out


def exact_top(
    query: np.ndarray, docs: Mapping[str, np.ndarray | None], k: int
) -> list[tuple[str, float]]:
    """Ground truth: reference MaxSim over every doc, score desc then uuid asc."""
    keys = [u for u, d in docs.items() if d is not None and len(d)]
    scores = maxsim_reference(query, [docs[u] for u in keys])  # type: ignore[misc]
    ranked = sorted(zip(keys, scores.tolist(), strict=True), key=lambda t: (-t[1], t[0]))
    return ranked[:k]


def open_engine(tmp: Path, spec: CollectionSpec, **kw: Any) -> ShardEngine:
    return ShardEngine(spec, 0, tmp / "shard", settings(**kw))


def drain(engine: ShardEngine, limit: int = 100) -> int:
    """Run maintenance until idle; returns the number of units done."""
    for n in range(limit):
        if not engine.maintenance():
            return n
    raise AssertionError("maintenance never went idle")


def test_support_self_check() -> None:
    assert uid(255) == "00000000-0000-4000-8000-0000000000ff"
    rng = np.random.default_rng(0)
    docs = {uid(i): d for i, d in enumerate(random_docs(rng, 5, 4))}
    top = exact_top(rng.standard_normal((2, 4)).astype(np.float32), docs, 3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
