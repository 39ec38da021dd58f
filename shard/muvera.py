"""MUVERA fixed-dimensional encodings (FDE): one vector per document whose inner product with a
query's FDE approximates MaxSim (Chamfer similarity); the candidate generator of a named vector
with ``index.kind == "muvera"``.

Dhulipala et al., "MUVERA: Multi-Vector Retrieval via Fixed Dimensional Encodings" (2024). Per
repetition ``r`` of ``R``:

1. **SimHash**: ``k_sim`` seeded Gaussian hyperplanes put every token into one of
   ``P = 2^k_sim`` partitions (bit ``j`` of its code = sign of ⟨token, g_j⟩).
2. **Inner projection** (optional): every token is projected to ``d_proj`` dims by a seeded
   random ±1 matrix scaled by 1/√d_proj (an AMS sketch: inner products are kept in
   expectation). ``d_proj = 0``: no projection, the token's own ``dim`` values.
3. **Document FDE**: per partition the *average* of the document's (projected) tokens in it;
   an empty partition takes the (projected) token whose SimHash code is nearest in Hamming
   distance to the partition's (``fill_empty_partitions``; ties: the first such token).
   **Query FDE**: per partition the *sum* of the query's tokens in it, no filling.

The repetitions are concatenated: ``R·2^k_sim·d_proj`` dims. ⟨FDE(Q), FDE(D)⟩ sums, over query
tokens ``q`` and repetitions, ⟨q, mean of D's tokens that fell into q's partition⟩ — a proxy
for ``max_d ⟨q, d⟩`` whose quality grows with ``k_sim`` (finer partitions) and ``R``.

Encoding is vectorised over ragged documents (flat tokens + offsets like shard.maxsim): per
repetition one matmul for codes and projections, one sort of (document, partition) keys and
``np.add.reduceat`` for the sums; the empty-partition fill is a ``np.minimum.reduceat`` over
(Hamming distance, token) keys. No Python loop per document.

The random matrices are drawn from ``seed`` and **stored with each segment's index**
(``MuveraIndex.serialize``), so a segment's query encoding matches its document encoding after
a restart whatever the numpy version; segments whose matrices are identical share one encoder
and so one query FDE. FDEs are stored as 16-bit **bfloat16** (``fde.npy`` of uint16 bit
patterns, memory-mapped on load): 2 bytes per dimension like float16, but widening to float32
is an integer shift (``fde_scores``), ~25× faster in numpy than the float16 cast, and its 8
mantissa bits lose no measurable recall against float32 for ranking candidates.

Search (``shard.search.fde_allow_lists``, called by the engine; ``top_candidates`` here): the
query's FDE against every eligible document's FDE of every FDE-indexed segment, the shard-wide
top ``max(candidates, 4·k)`` become those segments' allow-lists for shard.search, which
re-scores them with exact MaxSim.

Index options (``index.options`` of a ``muvera`` vector; defaults and ranges in
cluster.spec.MUVERA_DEFAULTS / MUVERA_RANGES, checked when a collection is created):
``repetitions`` (R, default 20), ``k_sim`` (default 2), ``d_proj`` (default 16; 0 = none),
``fill_empty_partitions`` (default true), ``seed`` (default 0) and ``candidates`` (documents
re-scored with exact MaxSim per query and shard, default 500). Defaults measured on the
benchmark's synthetic sets and MiniLM docstrings (docs/bench.md, "MUVERA"): 1,280 dims.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.spec import MUVERA_DEFAULTS
from shard.maxsim import widen

U16 = npt.NDArray[np.uint16]  # bfloat16 bit patterns
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

FORMAT = 1
META_FILE = "colshard_muvera.json"
FDE_FILE = "fde.npy"
SIMHASH_FILE = "simhash.npy"
PROJECTION_FILE = "projection.npy"
# Encoding works on blocks of whole documents: at most this many tokens, and small enough that
# the block's float32 FDEs and its (tokens, partitions) int64 Hamming table each stay below
# ENCODE_BLOCK_BYTES (the defaults: 65,536 tokens, ~13k documents).
ENCODE_BLOCK_TOKENS = 65_536
ENCODE_BLOCK_BYTES = 64 * 1024 * 1024
# FDE values widened to float32 per block during a scan (2 MB: ~400 rows of 1,280 dims; blocks
# of 128-1,024 rows measured within 10 % of each other, smaller ones slower).
SCAN_BLOCK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class FdeParams:
    dim: int  # token dimension
    repetitions: int
    k_sim: int
    d_proj: int  # 0: no inner projection
    fill_empty_partitions: bool
    seed: int

    @property
    def n_partitions(self) -> int:
        return 1 << self.k_sim

    @property
    def proj_dim(self) -> int:
        return self.d_proj if self.d_proj > 0 else self.dim

    @property
    def fde_dim(self) -> int:
        return self.repetitions * self.n_partitions * self.proj_dim

    @classmethod
    def from_options(cls, dim: int, options: Mapping[str, Any] | None) -> FdeParams:
        opts = {**MUVERA_DEFAULTS, **(options or {})}
        return cls(
            dim=int(dim),
            repetitions=int(opts["repetitions"]),
            k_sim=int(opts["k_sim"]),
            d_proj=int(opts["d_proj"]),
            fill_empty_partitions=bool(opts["fill_empty_partitions"]),
            seed=int(opts["seed"]),
        )


def candidates_option(options: Mapping[str, Any] | None) -> int:
    return int({**MUVERA_DEFAULTS, **(options or {})}["candidates"])


class FdeEncoder:
    """The random matrices of one parameter set: encodes documents and queries."""

    def __init__(self, params: FdeParams, simhash: F32, projection: F32 | None) -> None:
        p = params
        assert simhash.shape == (p.repetitions, p.dim, p.k_sim), simhash.shape
        if p.d_proj > 0:
            assert projection is not None and projection.shape == (p.repetitions, p.dim, p.d_proj)
        self.params = params
        self.simhash = np.ascontiguousarray(simhash, dtype=np.float32)
        self.projection = (
            None
            if projection is None or p.d_proj == 0
            else np.ascontiguousarray(projection, dtype=np.float32)
        )
        # One matmul per block for every repetition: [simhash planes | projections].
        mats = [self.simhash[r] for r in range(p.repetitions)]
        if self.projection is not None:
            mats += [self.projection[r] for r in range(p.repetitions)]
        self._combined = (
            np.ascontiguousarray(np.concatenate(mats, axis=1))
            if mats
            else np.zeros((p.dim, 0), dtype=np.float32)
        )
        h = hashlib.sha256(json.dumps(asdict(p), sort_keys=True).encode())
        h.update(self.simhash.tobytes())
        if self.projection is not None:
            h.update(self.projection.tobytes())
        self.digest = h.hexdigest()  # equal digests encode identically
        bits = (np.arange(p.n_partitions)[:, None] >> np.arange(p.k_sim)[None, :]) & 1
        # popcount of every k_sim-bit value (Hamming distance = popcount(code ^ partition)).
        self._popcount = bits.sum(axis=1).astype(np.int64) if p.k_sim else np.zeros(1, np.int64)

    @classmethod
    def from_params(cls, params: FdeParams) -> FdeEncoder:
        """Draw the matrices from ``params.seed`` (only when building: loads use the stored
        matrices)."""
        p = params
        rng = np.random.default_rng(p.seed)
        simhash = rng.standard_normal((p.repetitions, p.dim, p.k_sim)).astype(np.float32)
        projection = None
        if p.d_proj > 0:
            signs = rng.integers(0, 2, size=(p.repetitions, p.dim, p.d_proj), dtype=np.int8)
            projection = (2 * signs.astype(np.float32) - 1) / np.float32(math.sqrt(p.d_proj))
        return cls(p, simhash, projection)

    # ------------------------------------------------------------------ encoding

    def _codes_and_projections(
        self, tokens: npt.NDArray[np.floating[Any]]
    ) -> tuple[I64, list[F32]]:
        """Per repetition: SimHash codes (R, n) and the projected tokens (n, proj_dim) (the
        tokens themselves, shared, without a projection)."""
        p = self.params
        x = np.ascontiguousarray(widen(tokens))
        n = x.shape[0]
        both = x @ self._combined  # (n, R·k_sim [+ R·d_proj])
        n_bits = p.repetitions * p.k_sim
        codes = np.zeros((p.repetitions, n), dtype=np.int64)
        if p.k_sim:
            signs = (both[:, :n_bits] > 0).reshape(n, p.repetitions, p.k_sim)
            weights = 1 << np.arange(p.k_sim, dtype=np.int64)
            codes = np.ascontiguousarray((signs.astype(np.int64) @ weights).T)  # (R, n)
        if self.projection is None:
            return codes, [x] * p.repetitions
        # Strided column slices: the caller gathers their rows in sorted order anyway.
        return codes, [
            both[:, n_bits + r * p.d_proj : n_bits + (r + 1) * p.d_proj]
            for r in range(p.repetitions)
        ]

    def encode_documents(
        self, tokens: npt.NDArray[np.floating[Any]], offsets: I64, *, bf16: bool = True
    ) -> npt.NDArray[Any]:
        """Document FDEs ``(n_docs, fde_dim)`` of a flat token matrix, as bfloat16 bit
        patterns (``bf16``, the stored form) or float32; a document without tokens gets
        zeros. Works in blocks of whole documents (``ENCODE_BLOCK_TOKENS``)."""
        p = self.params
        n_docs = len(offsets) - 1
        out = np.zeros((n_docs, p.fde_dim), dtype=np.uint16 if bf16 else np.float32)
        max_tokens = max(1, min(ENCODE_BLOCK_TOKENS, ENCODE_BLOCK_BYTES // (8 * p.n_partitions)))
        max_docs = max(1, ENCODE_BLOCK_BYTES // (4 * p.fde_dim))
        doc = 0
        while doc < n_docs:
            limit = int(offsets[doc]) + max_tokens
            end = int(np.searchsorted(offsets, limit, side="right")) - 1
            end = min(max(end, doc + 1), doc + max_docs, n_docs)
            lo, hi = int(offsets[doc]), int(offsets[end])
            if hi > lo:
                block = self._encode_block(
                    tokens[lo:hi],
                    offsets[doc : end + 1] - lo,
                    average=True,
                    fill=self.params.fill_empty_partitions,
                )
                out[doc:end] = to_bf16(block) if bf16 else block
            doc = end
        return out

    def encode_query(self, query: npt.NDArray[np.floating[Any]]) -> F32:
        """The query's FDE ``(fde_dim,)``: per partition the sum of its tokens, no filling.
        (Every repetition at once: one sort of the R·n (repetition, partition) cells.)"""
        p = self.params
        out = np.zeros((p.repetitions * p.n_partitions, p.proj_dim), dtype=np.float32)
        n = len(query)
        if n == 0:
            return out.reshape(-1)
        x = np.ascontiguousarray(query, dtype=np.float32)
        both = x @ self._combined
        n_bits = p.repetitions * p.k_sim
        cell = np.repeat(np.arange(p.repetitions, dtype=np.int64) * p.n_partitions, n)
        if p.k_sim:
            signs = (both[:, :n_bits] > 0).reshape(n, p.repetitions, p.k_sim)
            codes = signs.astype(np.int64) @ (1 << np.arange(p.k_sim, dtype=np.int64))
            cell += codes.T.reshape(-1)
        if self.projection is None:
            rows = np.tile(x, (p.repetitions, 1))
        else:
            rows = both[:, n_bits:].reshape(n, p.repetitions, p.d_proj).transpose(1, 0, 2)
            rows = rows.reshape(p.repetitions * n, p.d_proj)
        order = np.argsort(cell, kind="stable")
        sorted_cells = cell[order]
        starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
        out[sorted_cells[starts]] = np.add.reduceat(rows[order], starts, axis=0)
        fde: F32 = out.reshape(-1)
        return fde

    def _encode_block(
        self, tokens: npt.NDArray[np.floating[Any]], offsets: I64, *, average: bool, fill: bool
    ) -> F32:
        p = self.params
        n_docs = len(offsets) - 1
        n_tok = int(offsets[-1])
        n_part, width = p.n_partitions, p.proj_dim
        codes, proj = self._codes_and_projections(tokens)
        lengths = np.diff(offsets)
        doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
        out = np.zeros((n_docs, p.repetitions, n_part, width), dtype=np.float32)
        flat = out.reshape(n_docs, p.repetitions, n_part * width)
        nonempty = np.flatnonzero(lengths > 0)
        for r in range(p.repetitions):
            key = doc_of * n_part + codes[r]  # (doc, partition) of every token
            order = np.argsort(key, kind="stable")
            skey = key[order]
            starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
            sums = np.add.reduceat(proj[r][order], starts, axis=0)  # (n_cells, width)
            cells = skey[starts]
            if average:
                counts = np.diff(np.r_[starts, n_tok]).astype(np.float32)
                sums /= counts[:, None]
            rep = np.zeros((n_docs * n_part, width), dtype=np.float32)
            rep[cells] = sums
            if fill and n_part > 1:
                filled = np.zeros(n_docs * n_part, dtype=np.bool_)
                filled[cells] = True
                if not filled.reshape(n_docs, n_part)[nonempty].all():
                    # Per (document, partition): the document's token nearest in Hamming
                    # distance (first on ties) = min over its tokens of distance·n_tok + index.
                    part = np.arange(n_part, dtype=np.int64)
                    dist = self._popcount[codes[r][:, None] ^ part[None, :]]  # (n_tok, P)
                    keyed = dist * n_tok + np.arange(n_tok, dtype=np.int64)[:, None]
                    best = np.minimum.reduceat(keyed, offsets[nonempty], axis=0) % n_tok
                    empty_cells = np.flatnonzero(
                        ~filled.reshape(n_docs, n_part)[nonempty].reshape(-1)
                    )
                    doc_rows = nonempty[empty_cells // n_part]
                    parts = empty_cells % n_part
                    tok = best.reshape(-1)[empty_cells]
                    rep[doc_rows * n_part + parts] = proj[r][tok]
            flat[:, r, :] = rep.reshape(n_docs, n_part * width)
        result: F32 = out.reshape(n_docs, p.fde_dim)
        return result


def to_bf16(values: npt.NDArray[np.floating[Any]]) -> U16:
    """float32 → bfloat16 bit patterns (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    out: U16 = (rounded >> np.uint32(16)).astype(np.uint16)
    return out


def from_bf16(bits: U16) -> F32:
    wide = bits.astype(np.uint32) << np.uint32(16)
    out: F32 = wide.view(np.float32)
    return out


def fde_scores(fde: U16, query_fde: F32, rows: I64 | None = None) -> F64:
    """⟨query FDE, document FDE⟩ of every row (or of ``rows``) of a bfloat16 FDE matrix.

    Block by block: the uint16 rows are widened into a uint32 buffer, shifted into float32
    and multiplied with the query (the block stays in cache). Measured ~5.5-7 ms for
    20k × 1,280 on one core (memory-bound: ~10 GB/s), against 60-190 ms for the same scan over
    float16 (numpy's float16 → float32 cast is scalar code) and ~9.5 ms over a float32 copy
    twice the size."""
    q = np.ascontiguousarray(query_fde, dtype=np.float32)
    fde = np.asarray(fde)  # a plain view of a memmap: no subclass overhead per block
    n = fde.shape[0] if rows is None else len(rows)
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    step = max(1, SCAN_BLOCK_ELEMENTS // max(1, fde.shape[1]))
    buf = np.empty((min(step, n), fde.shape[1]), dtype=np.uint32)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = buf[: hi - lo]
        np.copyto(block, fde[lo:hi] if rows is None else np.take(fde, rows[lo:hi], axis=0))
        np.left_shift(block, 16, out=block)
        out[lo:hi] = block.view(np.float32) @ q
    return out


_ENCODERS: dict[str, FdeEncoder] = {}


class MuveraIndex:
    """The FDEs of one sealed segment's documents, with the encoder that made them."""

    def __init__(self, encoder: FdeEncoder, fde: npt.NDArray[Any]) -> None:
        # Segments whose matrices are identical share one encoder (and so one query FDE).
        self.encoder = _ENCODERS.setdefault(encoder.digest, encoder)
        self.fde = fde
        self.n_docs = int(fde.shape[0])

    @property
    def params(self) -> FdeParams:
        return self.encoder.params

    @classmethod
    def build(
        cls,
        tokens: npt.NDArray[np.floating[Any]],
        offsets: I64,
        options: Mapping[str, Any] | None = None,
    ) -> MuveraIndex:
        params = FdeParams.from_options(int(tokens.shape[1]), options)
        encoder = FdeEncoder.from_params(params)
        return cls(encoder, encoder.encode_documents(tokens, offsets))

    def scores(self, query_fde: F32, rows: I64 | None = None) -> F64:
        return fde_scores(self.fde, query_fde, rows)

    def nbytes(self) -> int:
        return int(self.fde.nbytes)

    def serialize(self, directory: Path) -> None:
        """Write into an existing empty directory (renamed into place by the caller)."""
        enc = self.encoder
        np.save(directory / FDE_FILE, np.ascontiguousarray(self.fde))
        np.save(directory / SIMHASH_FILE, enc.simhash)
        if enc.projection is not None:
            np.save(directory / PROJECTION_FILE, enc.projection)
        meta = {
            "format": FORMAT,
            "params": asdict(enc.params),
            "n_docs": self.n_docs,
            "fde_dim": enc.params.fde_dim,
            "dtype": str(self.fde.dtype),
        }
        (directory / META_FILE).write_text(json.dumps(meta, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> MuveraIndex:
        meta = json.loads((directory / META_FILE).read_text())
        if int(meta.get("format", 0)) != FORMAT:
            raise ValueError(f"{directory}: unknown MUVERA index format {meta.get('format')}")
        params = FdeParams(**meta["params"])
        simhash = np.load(directory / SIMHASH_FILE)
        projection = np.load(directory / PROJECTION_FILE) if params.d_proj > 0 else None
        fde = np.load(directory / FDE_FILE, mmap_mode="r")
        if fde.shape != (int(meta["n_docs"]), params.fde_dim):
            raise ValueError(f"{directory}: FDE shape {fde.shape} does not match its metadata")
        return cls(FdeEncoder(params, simhash, projection), fde)

    @staticmethod
    def is_muvera_dir(directory: Path) -> bool:
        return (directory / META_FILE).is_file()


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class FdeSegment:
    """One segment's part of a shard-wide FDE candidate search."""

    index: MuveraIndex
    eligible: Bools  # (n_objects,)


def top_candidates(query: F32, segments: Sequence[FdeSegment], n: int) -> list[I64]:
    """Shard-wide top ``n`` eligible documents by FDE score: per segment its chosen rows
    (ascending). The query is encoded once per distinct encoder."""
    query_fdes: dict[str, F32] = {}
    per_seg: list[tuple[I64, F64]] = []
    for seg in segments:
        enc = seg.index.encoder
        qf = query_fdes.get(enc.digest)
        if qf is None:
            qf = query_fdes[enc.digest] = enc.encode_query(query)
        rows = np.flatnonzero(seg.eligible).astype(np.int64)
        if 2 * len(rows) >= seg.index.n_docs:  # most rows: scan all, in order (no gather)
            scores = seg.index.scores(qf)[rows]
        else:
            scores = seg.index.scores(qf, rows)
        per_seg.append((rows, scores))
    total = sum(len(r) for r, _ in per_seg)
    if total <= n:
        return [r for r, _ in per_seg]
    all_scores = np.concatenate([s for _, s in per_seg])
    keep = np.zeros(total, dtype=np.bool_)
    keep[np.argpartition(-all_scores, n - 1)[:n]] = True
    out = []
    at = 0
    for rows, _ in per_seg:
        out.append(rows[keep[at : at + len(rows)]])
        at += len(rows)
    return out
