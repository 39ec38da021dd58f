"""Baselines colshard is compared with, behind one small ``Searcher`` interface.

- ``BruteForce``: exact MaxSim over every document (numpy, float32 corpus in memory).
- ``FaissTokenAnn``: what users build by hand — a faiss-cpu index over all token vectors
  (HNSW32 or IVF-Flat), all query tokens searched in one call with k′ hits each, the union of
  the hits' documents re-scored with exact MaxSim (gather + one matmul + ``maximum.reduceat``).

Threads: OpenBLAS (numpy's and faiss's) and faiss's OpenMP pool are pinned with
``pin_threads``; the harness records what was set (``thread_info``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from bench.data import Dataset
from bench.truth import doc_chunks, maxsim_block
from cluster.types import F32, I64


@dataclass(frozen=True)
class SearchOutput:
    doc_ids: I64  # best first, at most k
    n_candidates: int  # documents re-scored exactly
    timings_s: dict[str, float] = field(default_factory=dict)  # optional phase split


class Searcher(Protocol):
    @property
    def name(self) -> str: ...

    def search(self, query: F32, k: int) -> SearchOutput: ...


def _top(scores: F32, ids: I64, k: int) -> I64:
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    order = np.lexsort((ids[part], -scores[part]))
    return ids[part[order]].astype(np.int64)


@contextmanager
def pin_threads(n_threads: int) -> Iterator[dict[str, Any]]:
    """Limit every BLAS/OpenMP pool in the process to ``n_threads`` (threadpoolctl + faiss)."""
    info: dict[str, Any] = {"threads": n_threads}
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a bench dependency
        info["threadpoolctl"] = "missing: thread pools not pinned"
        yield info
        return
    _set_faiss_threads(n_threads)
    with threadpool_limits(limits=n_threads):
        info["pools"] = [
            {
                k: p.get(k)
                for k in ("internal_api", "prefix", "version", "num_threads", "architecture")
            }
            for p in threadpool_info()
        ]
        yield info


def _set_faiss_threads(n_threads: int) -> None:
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n_threads)


class BruteForce:
    """Exact MaxSim over the whole corpus, one query at a time."""

    name = "numpy-bruteforce"

    def __init__(self, dataset: Dataset, chunk_tokens: int = 1 << 20) -> None:
        self.values = np.ascontiguousarray(dataset.values, dtype=np.float32)
        self.offsets = dataset.offsets
        self.chunks = doc_chunks(self.offsets, chunk_tokens)
        self.ids = np.arange(dataset.n_docs, dtype=np.int64)
        self.params: dict[str, Any] = {}

    def search(self, query: F32, k: int) -> SearchOutput:
        q_offsets = np.array([0, len(query)], dtype=np.int64)
        scores = np.empty(len(self.ids), dtype=np.float32)
        for d0, d1 in self.chunks:
            t0, t1 = int(self.offsets[d0]), int(self.offsets[d1])
            scores[d0:d1] = maxsim_block(
                query, q_offsets, self.values[t0:t1], self.offsets[d0 : d1 + 1] - t0
            )[0]
        return SearchOutput(_top(scores, self.ids, k), len(self.ids))

    def index_bytes(self) -> int:
        return 0


@dataclass(frozen=True)
class FaissConfig:
    kind: str  # "hnsw" | "ivf"
    k_prime: int  # token hits kept per query token
    ef_search: int = 0  # hnsw
    nprobe: int = 0  # ivf

    @property
    def label(self) -> str:
        knob = f"ef{self.ef_search}" if self.kind == "hnsw" else f"nprobe{self.nprobe}"
        return f"faiss-{self.kind} {knob} k'{self.k_prime}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "k_prime": self.k_prime}
        if self.kind == "hnsw":
            d["ef_search"] = self.ef_search
        else:
            d["nprobe"] = self.nprobe
        return d


# (efSearch, k′) and (nprobe, k′) sweeps: from cheap/low recall to expensive/high recall.
HNSW_SWEEP: tuple[tuple[int, int], ...] = (
    (32, 16),
    (64, 32),
    (128, 64),
    (128, 96),
    (256, 128),
    (512, 256),
)
IVF_SWEEP: tuple[tuple[int, int], ...] = ((4, 32), (8, 64), (16, 96), (32, 128), (64, 256))


def default_sweep(kinds: tuple[str, ...] = ("hnsw", "ivf")) -> list[FaissConfig]:
    out: list[FaissConfig] = []
    if "hnsw" in kinds:
        out += [FaissConfig("hnsw", k, ef_search=ef) for ef, k in HNSW_SWEEP]
    if "ivf" in kinds:
        out += [FaissConfig("ivf", k, nprobe=p) for p, k in IVF_SWEEP]
    return out


def ivf_nlist(n_tokens: int) -> int:
    """≈ 4·√n lists, rounded down to a power of two (512 for 64k tokens, 2048 for 640k)."""
    target = max(16, int(4 * np.sqrt(max(n_tokens, 1))))
    return int(2 ** int(np.log2(target)))


class FaissTokenAnn:
    """Token-level ANN (faiss) → candidate documents → exact MaxSim rerank."""

    def __init__(
        self,
        dataset: Dataset,
        kind: str,
        *,
        hnsw_m: int = 32,
        ef_construction: int = 40,
        nlist: int | None = None,
        train_per_list: int = 50,
        seed: int = 0,
    ) -> None:
        import faiss

        self.kind = kind
        self.values = np.ascontiguousarray(dataset.values, dtype=np.float32)
        self.offsets = dataset.offsets
        self.lengths = np.diff(self.offsets)
        self.token_doc = np.repeat(np.arange(dataset.n_docs, dtype=np.int64), self.lengths)
        dim = self.values.shape[1]
        t0 = time.perf_counter()
        index: Any
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.add(self.values)
            self.build_params: dict[str, Any] = {"M": hnsw_m, "efConstruction": ef_construction}
        elif kind == "ivf":
            nlist = nlist or ivf_nlist(len(self.values))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            n_train = min(len(self.values), nlist * train_per_list)
            rng = np.random.default_rng(seed)
            sample = self.values[np.sort(rng.choice(len(self.values), n_train, replace=False))]
            index.cp.min_points_per_centroid = 1  # tiny corpora: no faiss warning spam
            index.train(sample)
            index.add(self.values)
            self._quantizer = quantizer  # the IVF index does not own it: keep it alive
            self.build_params = {"nlist": nlist, "n_train": n_train}
        else:
            raise ValueError(f"unknown faiss index kind {kind!r}")
        self.build_s = time.perf_counter() - t0
        self.index = index
        self.config = FaissConfig(kind, 96, ef_search=128, nprobe=16)

    @property
    def name(self) -> str:
        return self.config.label

    def configure(self, config: FaissConfig) -> None:
        if config.kind != self.kind:
            raise ValueError(f"config for {config.kind} on a {self.kind} index")
        self.config = config
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(config.ef_search, config.k_prime)
        else:
            self.index.nprobe = config.nprobe

    def index_bytes(self) -> int:
        """Serialized size of the token index (vectors + graph or lists): its resident size."""
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)

    def search(self, query: F32, k: int) -> SearchOutput:
        t0 = time.perf_counter()
        _, labels = self.index.search(np.ascontiguousarray(query, np.float32), self.config.k_prime)
        t1 = time.perf_counter()
        hits = labels[labels >= 0]
        cand = np.unique(self.token_doc[hits])
        rows, local = gather_rows(self.offsets, self.lengths, cand)
        block = self.values[rows]
        t2 = time.perf_counter()
        scores = maxsim_block(query, np.array([0, len(query)], np.int64), block, local)[0]
        top = _top(scores, cand, k)
        t3 = time.perf_counter()
        return SearchOutput(top, len(cand), {"ann": t1 - t0, "gather": t2 - t1, "maxsim": t3 - t2})


def gather_rows(offsets: I64, lengths: I64, docs: I64) -> tuple[npt.NDArray[np.int64], I64]:
    """Token row indices of ``docs`` (concatenated) and their local offsets (starting at 0)."""
    lens = lengths[docs]
    local = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lens, out=local[1:])
    rows = np.repeat(offsets[docs] - local[:-1], lens) + np.arange(int(local[-1]))
    return rows.astype(np.int64), local
