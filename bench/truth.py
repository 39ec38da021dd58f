"""Exact MaxSim in numpy: the scoring kernel every baseline shares, and the cached ground truth.

    score(Q, D) = Σ_q max_d <q, d>

Scores for many queries at once: all query rows times a chunk of document tokens in one matmul,
then ``np.maximum.reduceat`` over each document's columns and ``np.add.reduceat`` over each
query's rows. Chunks end on document boundaries, so no document is split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.data import Dataset, _atomic_dir
from cluster.types import F32, I64

TRUTH_K = 100
TIE_EPS = 1e-5  # relative: scores this close to the k-th best count as ties
_CHUNK_CELLS = 48 * 1024 * 1024  # float32 cells of one similarity block (≈ 192 MB)


def maxsim_block(
    query_values: F32,
    query_offsets: I64,
    doc_values: F32,
    doc_offsets: I64,
) -> F32:
    """Exact MaxSim of every query against every document of one block.

    ``doc_values`` are the block's token rows, ``doc_offsets`` (starting at 0) split them into
    non-empty documents. Returns ``(n_queries, n_docs)`` float32 scores.
    """
    n_docs = len(doc_offsets) - 1
    n_queries = len(query_offsets) - 1
    if n_docs == 0 or n_queries == 0:
        return np.zeros((n_queries, n_docs), dtype=np.float32)
    sims = query_values @ doc_values.T  # (n_query_rows, n_doc_rows)
    per_doc = np.maximum.reduceat(sims, doc_offsets[:-1], axis=1)  # (n_query_rows, n_docs)
    return np.add.reduceat(per_doc, query_offsets[:-1], axis=0).astype(np.float32, copy=False)


def doc_chunks(offsets: I64, max_tokens: int) -> list[tuple[int, int]]:
    """Document ranges ``[start, stop)`` with at most ``max_tokens`` tokens each (≥ 1 doc)."""
    chunks: list[tuple[int, int]] = []
    n_docs = len(offsets) - 1
    start = 0
    while start < n_docs:
        limit = int(offsets[start]) + max_tokens
        stop = int(np.searchsorted(offsets, limit, side="right")) - 1
        stop = min(max(stop, start + 1), n_docs)
        chunks.append((start, stop))
        start = stop
    return chunks


def exact_scores(
    dataset: Dataset,
    query_ids: npt.NDArray[np.int64] | None = None,
    chunk_tokens: int | None = None,
) -> F32:
    """Full ``(n_queries, n_docs)`` exact MaxSim matrix (float16 storage read as float32)."""
    ids = np.arange(dataset.n_queries) if query_ids is None else np.asarray(query_ids)
    q_parts = [dataset.query(int(i)) for i in ids]
    q_offsets = np.zeros(len(q_parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in q_parts], out=q_offsets[1:])
    q_values = np.ascontiguousarray(np.concatenate(q_parts), dtype=np.float32)
    # Query-row batches keep the similarity block bounded whatever the number of queries.
    q_rows = max(int(q_offsets[-1]), 1)
    if chunk_tokens is None:
        chunk_tokens = max(4096, _CHUNK_CELLS // min(q_rows, 4096))
    batches = _query_batches(q_offsets, max_rows=4096)
    out = np.empty((len(ids), dataset.n_docs), dtype=np.float32)
    for d0, d1 in doc_chunks(dataset.offsets, chunk_tokens):
        t0, t1 = int(dataset.offsets[d0]), int(dataset.offsets[d1])
        block = np.asarray(dataset.values[t0:t1], dtype=np.float32)  # one conversion per chunk
        local = dataset.offsets[d0 : d1 + 1] - t0
        for b0, b1 in batches:
            r0, r1 = int(q_offsets[b0]), int(q_offsets[b1])
            out[b0:b1, d0:d1] = maxsim_block(
                q_values[r0:r1], q_offsets[b0 : b1 + 1] - r0, block, local
            )
    return out


def _query_batches(q_offsets: I64, max_rows: int) -> list[tuple[int, int]]:
    batches: list[tuple[int, int]] = []
    n = len(q_offsets) - 1
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and int(q_offsets[stop + 1] - q_offsets[start]) <= max_rows:
            stop += 1
        batches.append((start, stop))
        start = stop
    return batches


def top_k(scores: F32, k: int) -> tuple[npt.NDArray[np.int64], F32]:
    """Best ``k`` per row, best first; ties broken by the lower document index."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return ids, np.take_along_axis(scores, ids, axis=1)


@dataclass(frozen=True)
class GroundTruth:
    ids: npt.NDArray[np.int64]  # (n_queries, k) exact top-k documents, best first
    scores: F32  # (n_queries, k)
    build_s: float = 0.0

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def recall(
        self, query: int, found: npt.NDArray[np.int64], k: int, rel_eps: float = TIE_EPS
    ) -> float:
        """recall@k of ``found`` for ``query``, tie-aware (as ann-benchmarks does it).

        A found document counts when it is in the exact top-k, or when its exact score ties the
        k-th best within ``rel_eps`` (duplicate documents score identically, and the last bit of
        a float32 sum depends on how the matmul was blocked).
        """
        k = min(k, self.k)
        if k <= 0:
            return 1.0
        kth = float(self.scores[query, k - 1])
        tied = int(np.count_nonzero(self.scores[query] >= kth - rel_eps * max(1.0, abs(kth))))
        relevant = set(self.ids[query, : max(k, tied)].tolist())
        return min(k, len(set(found[:k].tolist()) & relevant)) / k


def ground_truth(dataset: Dataset, k: int = TRUTH_K, cache: bool = True) -> GroundTruth:
    """Exact top-``k`` per query, computed once and cached beside the dataset's queries."""
    import time

    where = dataset.path / f"truth-top{k}" if dataset.path is not None and cache else None
    if where is not None and (where / "ids.npy").exists():
        meta = json.loads((where / "meta.json").read_text())
        return GroundTruth(
            np.load(where / "ids.npy"),
            np.load(where / "scores.npy"),
            float(meta.get("build_s", 0.0)),
        )
    t0 = time.perf_counter()
    ids, scores = top_k(exact_scores(dataset), k)
    truth = GroundTruth(ids, scores, time.perf_counter() - t0)
    if where is not None:

        def write(tmp: Path) -> None:
            np.save(tmp / "ids.npy", truth.ids)
            np.save(tmp / "scores.npy", truth.scores)
            (tmp / "meta.json").write_text(json.dumps({"k": k, "build_s": truth.build_s}))

        _atomic_dir(where, write)
    return truth


def recall(found: npt.NDArray[np.int64], truth_ids: npt.NDArray[np.int64], k: int) -> float:
    """|found[:k] ∩ truth[:k]| / k for one query."""
    if k <= 0:
        return 1.0
    return len(set(found[:k].tolist()) & set(truth_ids[:k].tolist())) / k
