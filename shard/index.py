"""The token index: ScaNN over one sealed segment's token vectors. The only module that imports
scann.

A ``ScannTokenIndex`` answers "for each query token, which k' segment tokens are most similar"
(inner product; cosine vectors arrive normalised). The engine maps token ids to documents and
re-scores the candidates exactly, so the index only has to find the right *documents*.

Parameters follow the segment size (``choose_params``): ``num_leaves ≈ sqrt(n_tokens)`` up to 400
leaves (160k tokens), then 400 up to 640k tokens, then ``sqrt(n_tokens) / 2``; each query token
scans the share of the tokens that the √n partition with ``default_leaves_to_search`` would (5 %
of up to 400 leaves, 0.7·sqrt(leaves) above that), times ``coarse_scan_factor`` (0.6 once the
leaves are twice the √n size): 6 of 400 leaves for 635k tokens, 11 of 1,262 for 6.4M. Fewer,
larger leaves halve the build's largest cost, assigning every token to its nearest centre
(ScaNN's tree, ~4 of ~9 s for 635k tokens), at the same recall and query time (measured
on the small benchmark set: 797 leaves, 20 searched: recall@10 0.975-0.979, 164-167 QPS, build
10.9-11.3 s; 399 leaves, 10 searched: 0.972-0.974, 169-171 QPS, 8.2-8.7 s).
Anisotropic hashing with 5-dim blocks (2 for dim < 64): 16 centres per block, so a 128-d token
costs 26 bytes of codes (ScaNN serializes one byte per block) plus 4 for its leaf: ~31-33
bytes/token with the leaf centres. No ScaNN re-ordering by default: the engine
re-scores candidate *documents* exactly from the segment's own tokens, so a float copy inside the
index would multiply its memory for little recall. Measured on the benchmark's small synthetic set
(635k tokens × 128 d, 8 segments, k' 512, 300 documents re-scored): 4-dim blocks 38.8 bytes/token
and recall@10 0.974, 5-dim 33.0 and 0.963, 6-dim 29.1 and 0.956, 8-dim 23.2 and 0.933 at about the
same query time — the approximate pre-scoring (shard.search) ranks by these scores, so coarser
codes cost recall.

Per-vector overrides come from the spec's ``index.options``: ``num_leaves``,
``leaves_to_search``, ``leaves_to_search_fraction``, ``dims_per_block``, ``reorder`` (``"none"`` |
``"int8"`` | ``"float32"``), ``reorder_multiplier``, ``training_sample_size``, ``build_threads``.

Threads: builds use ``build_threads`` (default 1, so a build never takes both cores from queries);
searches use the calling thread only (``search_batched`` without ScaNN's thread pool) — query
parallelism comes from the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scann

from shard.maxsim import widen

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class IndexParams:
    num_leaves: int
    leaves_to_search: int
    training_sample_size: int
    dims_per_block: int
    reorder: str  # "none" | "int8" | "float32"
    reorder_multiplier: int
    build_threads: int


# Up to this many leaves a segment gets √n of them; above, fewer and larger ones (see
# ``choose_params``).
WIDE_LEAVES = 400


def choose_params(
    n_tokens: int, options: Mapping[str, Any] | None = None, dim: int = 128
) -> IndexParams:
    opts = dict(options or {})
    ref_leaves = max(8, round(math.sqrt(n_tokens)))  # the classic √n partition
    num_leaves = int(
        opts.get("num_leaves", max(min(ref_leaves, WIDE_LEAVES), round(ref_leaves / 2)))
    )
    num_leaves = max(1, min(num_leaves, n_tokens // 8 or 1))
    if "leaves_to_search" in opts:
        to_search = int(opts["leaves_to_search"])
    elif "leaves_to_search_fraction" in opts:
        to_search = max(4, math.ceil(num_leaves * float(opts["leaves_to_search_fraction"])))
    else:  # the share of the tokens the √n schedule would scan, less for coarser leaves
        to_search = max(
            4,
            round(
                default_leaves_to_search(ref_leaves)
                * num_leaves
                / ref_leaves
                * coarse_scan_factor(num_leaves, ref_leaves)
            ),
        )
    # k-means and the AH codebooks train on a sample: 64 points per leaf (at least 20k) keeps
    # recall and builds ~3× faster than training on a whole 100k-token segment. (A 10k sample
    # builds a 70k-token segment in 0.83 s instead of 1.10 s but cost the engine test's
    # 50k-token corpus 5-8 points of recall@10.)
    sample = int(opts.get("training_sample_size", max(20_000, 64 * num_leaves)))
    return IndexParams(
        num_leaves=num_leaves,
        leaves_to_search=max(1, min(to_search, num_leaves)),
        training_sample_size=max(num_leaves, min(sample, n_tokens)),
        dims_per_block=max(1, int(opts.get("dims_per_block", 5 if dim >= 64 else 2))),
        reorder=str(opts.get("reorder", "none")),
        reorder_multiplier=max(1, int(opts.get("reorder_multiplier", 2))),
        build_threads=max(1, int(opts.get("build_threads", 1))),
    )


# A segment with half as many leaves as √n (each leaf twice as large) scans this fraction of
# the tokens the √n schedule would (see ``coarse_scan_factor``).
COARSE_SCAN_SHARE = 0.6


def coarse_scan_factor(num_leaves: int, ref_leaves: int) -> float:
    """How much of the √n schedule's token share a partition of ``num_leaves`` leaves scans:
    1 at √n leaves (or finer), ``COARSE_SCAN_SHARE`` at √n/2 and coarser, linear in between (no
    jump where segments pass 400 leaves).

    Larger leaves hold a query token's neighbours in relatively fewer of them. Measured in-engine
    (one settled segment, k' and re-score depth at their defaults): the small synthetic set (635k
    tokens, 400 leaves, 300 queries) searched 6 instead of 10 leaves at recall@10 0.973 instead
    of 0.975 in 10 % less CPU per query; the medium set (6.37M tokens, 1,262 leaves, 100
    queries) 11 instead of 18 at 0.953 instead of 0.949 (7 % less); the small set at noise 0.1
    (tight clusters) 0.885 instead of 0.890 (5 % less)."""
    if ref_leaves <= 0 or num_leaves >= ref_leaves:
        return 1.0
    ratio = max(0.5, num_leaves / ref_leaves)  # 1 … 0.5
    return COARSE_SCAN_SHARE + (1.0 - COARSE_SCAN_SHARE) * (2.0 * ratio - 1.0)


def default_leaves_to_search(num_leaves: int) -> int:
    """Leaves searched per query token by default: 5 % of up to 400 leaves (at least 4); above
    400 leaves 0.7·sqrt(leaves) when that is more (a 635k-token segment: 20 of 797; 6.4M
    tokens: 36 of 2,525). The share falls as segments grow: a query token's neighbours
    concentrate in relatively fewer leaves.

    Measured in-engine: on the small synthetic sets (635k tokens, noise 0.6 and 0.1; k' 384,
    300 re-scored documents) and MiniLM docstrings (221k tokens, 384-d) recall@10 is the same
    within ±0.003 from 12 to 40 leaves, while ScaNN's share of a query drops from ~3.7 to ~2.6
    ms; on the medium set (6.37M tokens, k' 2048, 1,200 re-scored) 32 leaves gave 0.955 and 64
    (2.5 %) 0.956 in 9 % less time. Below 400 leaves the fraction stays at 5 %: the engine
    test's 64-d corpus (224 leaves) lost 5-10 points of recall at 2.5 %."""
    wide = math.ceil(0.7 * math.sqrt(num_leaves)) if num_leaves > 400 else 0
    return max(4, math.ceil(0.05 * min(num_leaves, 400)), wide)


class ScannTokenIndex:
    """ScaNN tree + AH searcher over a fixed token matrix (row ids = token ids)."""

    def __init__(self, searcher: Any, n_tokens: int, params: IndexParams) -> None:
        self._searcher = searcher
        self.n_tokens = n_tokens
        self.params = params

    @classmethod
    def build(
        cls,
        tokens: npt.NDArray[np.floating],
        k_default: int,
        options: Mapping[str, Any] | None = None,
    ) -> ScannTokenIndex:
        db = np.ascontiguousarray(widen(tokens))
        n = int(db.shape[0])
        assert n > 0, "cannot index an empty segment"
        params = choose_params(n, options, dim=int(db.shape[1]))
        k = max(1, min(k_default, n))
        builder = (
            scann.scann_ops_pybind.builder(db, k, "dot_product")
            .tree(
                num_leaves=params.num_leaves,
                num_leaves_to_search=params.leaves_to_search,
                training_sample_size=params.training_sample_size,
                # k-means++ seeding: ScaNN's random initialisation is not seeded, so two
                # builds of the same tokens partitioned them differently
                random_init=False,
            )
            .score_ah(
                params.dims_per_block,
                anisotropic_quantization_threshold=0.2,
                training_sample_size=params.training_sample_size,
            )
        )
        if params.reorder != "none":
            quantize = (
                scann.ReorderType.FLOAT32 if params.reorder == "float32" else scann.ReorderType.INT8
            )
            builder = builder.reorder(k * params.reorder_multiplier, quantize=quantize)
        searcher = builder.set_n_training_threads(params.build_threads).build()
        return cls(searcher, n, params)

    def search(self, queries: F32, k_per_token: int, leaves_factor: float = 1.0) -> tuple[I64, F32]:
        """The ``k_per_token`` best tokens for every query row: ``(ids, sims)``, both
        ``(n_query, k)``, best first; ``sims`` are ScaNN's (approximate) inner products.
        Padding (fewer hits than asked for) has id -1 and sim -inf. ``leaves_factor`` scales
        the leaves searched (calibrated search depth, shard.calibrate)."""
        k = max(1, min(k_per_token, self.n_tokens))
        leaves = self.params.leaves_to_search
        if leaves_factor != 1.0:
            leaves = max(1, min(self.params.num_leaves, math.ceil(leaves * leaves_factor)))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        pre = (
            min(self.n_tokens, k * self.params.reorder_multiplier)
            if self.params.reorder != "none"
            else k
        )
        idx, dist = self._searcher.search_batched(
            q, final_num_neighbors=k, pre_reorder_num_neighbors=pre, leaves_to_search=leaves
        )
        ids = np.asarray(idx, dtype=np.int64).reshape(len(q), -1)
        sims = np.asarray(dist, dtype=np.float32).reshape(len(q), -1).copy()
        pad = ~np.isfinite(sims)
        ids[pad] = -1
        sims[pad] = -np.inf
        return ids, sims

    def serialize(self, directory: Path) -> None:
        """Write the searcher into an existing empty directory (relative asset paths, so the
        directory can be renamed into place afterwards)."""
        self._searcher.serialize(str(directory), relative_path=True)
        meta = f"{self.n_tokens}\n{_params_line(self.params)}\n"
        (directory / "colshard_index.txt").write_text(meta)

    @classmethod
    def load(cls, directory: Path) -> ScannTokenIndex:
        lines = (directory / "colshard_index.txt").read_text().splitlines()
        n_tokens = int(lines[0])
        params = _parse_params_line(lines[1])
        searcher = scann.scann_ops_pybind.load_searcher(str(directory))
        return cls(searcher, n_tokens, params)


def _params_line(p: IndexParams) -> str:
    return (
        f"{p.num_leaves} {p.leaves_to_search} {p.training_sample_size} {p.dims_per_block} "
        f"{p.reorder} {p.reorder_multiplier} {p.build_threads}"
    )


def _parse_params_line(line: str) -> IndexParams:
    a, b, c, d, reorder, e, f = line.split()
    return IndexParams(int(a), int(b), int(c), int(d), reorder, int(e), int(f))
