"""Compressed token storage for sealed segments: the ``int8`` and ``residual`` codecs.

A named vector's ``codec`` (``cluster.spec.CodecSpec``) says how a sealed segment stores its
tokens; float32 / float16 are plain arrays (``shard.segment``), the two lossy codecs are
``CodedTokens`` here:

- **int8**: ``x[d] ≈ scale[d] · code[d]``, one signed byte per dimension, ``scale[d]`` = the
  segment's largest ``|x[d]|`` / 127. The query is scaled once per segment (``q[d]·scale[d]``),
  so a token's similarity is the dot product of its bytes (widened) with the scaled query.
- **residual** (ColBERTv2-style): ``x ≈ centroid[c] + w[d][b_d]``: the nearest of the
  segment's k-means centroids (one int32 id per token) plus a ``bits``-bit (2 or 4) bucket per
  dimension whose reconstruction value ``w[d][b]`` is the mean of the training residuals in
  that bucket (bucket cut-offs: per-dimension quantiles). 128 dims at 2 bits: 32 bytes + the id.

Scoring runs on the codes (``shard.kernels``): per document, its rows are decoded into a small
scratch block that one BLAS matmul scores — never a decoded copy of the corpus. Slicing
(``tokens[a:b]``) and ``take`` decode those rows only (fetch, index builds, calibration samples).

**Merges copy codes** (``gather``): a merged segment's centroid table is its sources' tables
concatenated (ids shifted), so nothing is re-quantised — as long as the sources share the
residual buckets (the shard's first coded segment trains them and every later segment of the
shard reuses them: ``encode(..., reference=)``) or, for int8, the scales. Sources that differ
(a segment restored from elsewhere) are decoded and re-encoded, which adds quantisation error
once more.

Files in the segment directory (beside ``vec-<name>.arrow``, whose ``vector`` column holds the
codes: int8 rows, or the packed residual bytes plus a ``centroid`` column)::

    codec-<name>.npz    kind, and scale (int8) | bits, centroids, cutoffs, weights (residual)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from shard.kernels import decode_int8, decode_residual, maxsim_coded
from shard.maxsim import widen

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

# Tokens per centroid a residual segment trains (k-means K = n / this, a power of two): the
# centroid table then costs 4·dim/256 bytes per token (2 at dim 128), and merged segments keep
# that ratio (their tables are concatenated).
TOKENS_PER_CENTROID = 256
MAX_CENTROIDS = 4096
KMEANS_ITERS = 6
# k-means trains on a sample of this many tokens per centroid (at most TRAIN_SAMPLE), and the
# buckets on BUCKET_SAMPLE residuals (quantiles are stable long before): a 65k-token seal
# encodes in ~0.4 s here.
SAMPLE_PER_CENTROID = 64
TRAIN_SAMPLE = 262_144
BUCKET_SAMPLE = 16_384
# Rows assigned to centroids per matmul (bounds the (rows, K) score block).
ASSIGN_CHUNK = 8192


def codec_path(directory: Path, vector: str) -> Path:
    return directory / f"codec-{vector}.npz"


# --------------------------------------------------------------------------- the two codecs


class _Rows:
    """What both codecs share: ``tokens[a:b]`` decodes rows ``a:b`` (``take``)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, idx: I64) -> F32:
        raise NotImplementedError

    def __getitem__(self, rows: slice) -> F32:
        lo, hi, _ = rows.indices(len(self))
        return self.take(np.arange(lo, max(lo, hi), dtype=np.int64))


@dataclass(frozen=True, eq=False)
class Int8Tokens(_Rows):
    codes: npt.NDArray[np.int8]  # (n, dim)
    scale: F32  # (dim,)
    kind: str = "int8"

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def code_bytes(self) -> int:
        return int(self.codes.nbytes + self.scale.nbytes)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def take(self, idx: I64) -> F32:
        out = np.empty((len(idx), self.shape[1]), dtype=np.float32)
        decode_int8(self.codes, self.scale, np.ascontiguousarray(idx, dtype=np.int64), out)
        return out

    def score(self, query: F32, starts: I64, ends: I64) -> F64:
        scaled = np.asarray(query, dtype=np.float32) * self.scale[None, :]
        return maxsim_coded(scaled, starts, ends, int8=self.codes)


@dataclass(frozen=True, eq=False)
class ResidualTokens(_Rows):
    cids: npt.NDArray[np.int32]  # (n,) centroid of every token
    packed: npt.NDArray[np.uint8]  # (n, ceil(dim·bits/8)) bucket codes, low bits first
    centroids: F32  # (K, dim)
    cutoffs: F32  # (dim, 2^bits − 1) bucket boundaries of the residual per dimension
    weights: F32  # (dim, 2^bits) reconstruction value of each bucket
    bits: int
    kind: str = "residual"

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.cids.shape[0]), self.dim)

    @property
    def code_bytes(self) -> int:
        return int(self.cids.nbytes + self.packed.nbytes + self.centroids.nbytes)

    @property
    def width(self) -> int:
        """Values the packed bytes hold per token: ``dim`` rounded up to ``8 / bits``."""
        return int(self.packed.shape[1]) * (8 // self.bits)

    @cached_property
    def table(self) -> F32:
        """``(n_bytes · 256, 8 / bits)``: the residual values packed byte ``p`` decodes to, at
        row ``p · 256 + byte`` (``byte_table``)."""
        return byte_table(self.weights, self.bits)

    @cached_property
    def wide_centroids(self) -> F32:
        """``centroids`` as wide as the packed values (``width``): zero columns where ``dim``
        does not fill the last byte."""
        pad = self.width - self.dim
        if not pad:
            return self.centroids
        return np.ascontiguousarray(np.pad(self.centroids, ((0, 0), (0, pad))))

    def __len__(self) -> int:
        return int(self.cids.shape[0])

    def take(self, idx: I64) -> F32:
        out = np.empty((len(idx), self.width), dtype=np.float32)
        decode_residual(
            self.cids,
            self.packed,
            self.wide_centroids,
            self.table,
            np.ascontiguousarray(idx, dtype=np.int64),
            out,
        )
        return out if self.width == self.dim else np.ascontiguousarray(out[:, : self.dim])

    def score(self, query: F32, starts: I64, ends: I64) -> F64:
        q = np.asarray(query, dtype=np.float32)
        if self.width != self.dim:
            q = np.pad(q, ((0, 0), (0, self.width - self.dim)))
        return maxsim_coded(
            q,
            starts,
            ends,
            residual=(self.cids, self.packed, self.wide_centroids, self.table),
        )


CodedTokens = Int8Tokens | ResidualTokens


def is_coded(tokens: object) -> TypeGuard[CodedTokens]:
    return isinstance(tokens, Int8Tokens | ResidualTokens)


def byte_table(weights: F32, bits: int) -> F32:
    """Row ``p · 256 + byte``: the ``8 / bits`` residual values byte ``p`` of a token's packed
    buckets decodes to (dimensions ``p · per …``; zero past ``dim``)."""
    dim, n_buckets = weights.shape
    per = 8 // bits
    n_bytes = math.ceil(dim / per)
    padded = np.zeros((n_bytes * per, n_buckets), dtype=np.float32)
    padded[:dim] = weights
    values = np.arange(256)
    out = np.empty((n_bytes, 256, per), dtype=np.float32)
    for i in range(per):
        bucket = (values >> (i * bits)) & (n_buckets - 1)
        out[:, :, i] = padded[i::per][:, bucket]
    return np.ascontiguousarray(out.reshape(n_bytes * 256, per))


# --------------------------------------------------------------------------- encoding


def encode(
    tokens: npt.NDArray[np.floating[Any]],
    kind: str,
    bits: int = 0,
    *,
    reference: CodedTokens | None = None,
    seed: int = 0,
) -> CodedTokens:
    """``tokens`` (n, dim) in the codec ``kind``. ``reference``: a coded segment of the same
    vector whose residual buckets or int8 scale are reused, so merges can copy codes."""
    x = np.ascontiguousarray(tokens, dtype=np.float32)
    if kind == "int8":
        return _encode_int8(x, reference)
    assert kind == "residual" and bits in (2, 4), (kind, bits)
    return _encode_residual(
        x, bits, reference if isinstance(reference, ResidualTokens) else None, seed
    )


def _encode_int8(x: F32, reference: CodedTokens | None = None) -> Int8Tokens:
    """Per-dimension scale = the largest ``|x[d]|`` / 127 — or the ``reference``'s scale where
    every value fits it, so that segments of one shard share a scale and merges copy codes."""
    dim = int(x.shape[1])
    peak = np.abs(x).max(axis=0) if len(x) else np.zeros(dim, dtype=np.float32)
    if isinstance(reference, Int8Tokens) and np.all(peak <= 127.0 * reference.scale):
        return Int8Tokens(_quantise_int8(x, reference.scale), reference.scale)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    if isinstance(reference, Int8Tokens):  # the reference's scale where it is larger
        scale = np.maximum(scale, reference.scale)
    return Int8Tokens(_quantise_int8(x, scale), scale)


def _quantise_int8(x: F32, scale: F32) -> npt.NDArray[np.int8]:
    codes = np.rint(x / scale[None, :])
    np.clip(codes, -127, 127, out=codes)
    out: npt.NDArray[np.int8] = codes.astype(np.int8)
    return out


def _encode_residual(
    x: F32, bits: int, reference: ResidualTokens | None, seed: int
) -> ResidualTokens:
    n, dim = x.shape
    rng = np.random.default_rng(seed)
    k = centroid_count(n)
    size = min(TRAIN_SAMPLE, max(SAMPLE_PER_CENTROID * k, BUCKET_SAMPLE))
    sample = x if n <= size else x[np.sort(rng.choice(n, size, replace=False))]
    centroids = kmeans(sample, k, rng) if n else np.zeros((1, dim), dtype=np.float32)
    cids = assign(x, centroids)
    if reference is not None and reference.bits == bits and reference.dim == dim:
        cutoffs, weights = reference.cutoffs, reference.weights
    else:
        pick = rng.choice(n, min(n, BUCKET_SAMPLE), replace=False) if n else np.zeros(0, int)
        cutoffs, weights = train_buckets(x[pick] - centroids[cids[pick]], bits)
    packed = _pack_residuals(x, cids, centroids, cutoffs, bits)
    return ResidualTokens(cids, packed, centroids, cutoffs, weights, bits)


def centroid_count(n_tokens: int) -> int:
    """k-means K for a segment of ``n_tokens``: the power of two nearest n / 256, 1…4096."""
    if n_tokens < 2 * TOKENS_PER_CENTROID:
        return 1
    k = 2 ** round(math.log2(n_tokens / TOKENS_PER_CENTROID))
    return int(min(MAX_CENTROIDS, max(1, k)))


def kmeans(x: F32, k: int, rng: np.random.Generator, iters: int = KMEANS_ITERS) -> F32:
    """Lloyd's k-means (inner-product assignment to the nearest centre by squared distance),
    initialised with ``k`` distinct sample points; an emptied centre restarts at a random
    point."""
    n = len(x)
    k = max(1, min(k, n))
    if k == 1:
        mean: F32 = x.mean(axis=0, keepdims=True).astype(np.float32)
        return mean
    centres = x[rng.choice(n, k, replace=False)].copy()
    for _ in range(iters):
        labels = assign(x, centres)
        counts = np.bincount(labels, minlength=k)
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        empty = counts == 0
        sums = np.add.reduceat(x[order], np.minimum(starts, n - 1), axis=0)
        centres = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        if empty.any():
            centres[empty] = x[rng.choice(n, int(empty.sum()), replace=False)]
    return centres


def assign(x: F32, centres: F32) -> npt.NDArray[np.int32]:
    """The nearest centre (squared Euclidean) of every row, in chunks of ``ASSIGN_CHUNK``."""
    half_norms = 0.5 * np.einsum("ij,ij->i", centres, centres)
    out = np.empty(len(x), dtype=np.int32)
    for lo in range(0, len(x), ASSIGN_CHUNK):
        block = x[lo : lo + ASSIGN_CHUNK] @ centres.T
        block -= half_norms[None, :]
        out[lo : lo + ASSIGN_CHUNK] = block.argmax(axis=1)
    return out


def train_buckets(residuals: F32, bits: int) -> tuple[F32, F32]:
    """Per dimension: cut-offs at the residuals' quantiles (equal-population buckets) and each
    bucket's mean residual as its value (the bucket's midpoint quantile where it is empty)."""
    n_buckets = 1 << bits
    dim = residuals.shape[1]
    if len(residuals) == 0:
        return np.zeros((dim, n_buckets - 1), np.float32), np.zeros((dim, n_buckets), np.float32)
    qs = np.arange(1, n_buckets) / n_buckets
    cutoffs = np.quantile(residuals, qs, axis=0).T.astype(np.float32)  # (dim, B-1)
    mids = np.quantile(residuals, (np.arange(n_buckets) + 0.5) / n_buckets, axis=0).T
    weights = mids.astype(np.float32)
    buckets = _buckets(residuals, cutoffs)
    for d in range(dim):
        sums = np.bincount(buckets[:, d], weights=residuals[:, d], minlength=n_buckets)
        counts = np.bincount(buckets[:, d], minlength=n_buckets)
        seen = counts > 0
        weights[d, seen] = (sums[seen] / counts[seen]).astype(np.float32)
    return cutoffs, weights


def _buckets(residuals: F32, cutoffs: F32) -> npt.NDArray[np.uint8]:
    out = np.zeros(residuals.shape, dtype=np.uint8)
    for j in range(cutoffs.shape[1]):
        out += residuals > cutoffs[None, :, j]
    return out


def _pack_residuals(
    x: F32, cids: npt.NDArray[np.int32], centroids: F32, cutoffs: F32, bits: int
) -> npt.NDArray[np.uint8]:
    n, dim = x.shape
    per = 8 // bits
    n_bytes = math.ceil(dim / per)
    packed = np.zeros((n, n_bytes), dtype=np.uint8)
    for lo in range(0, n, ASSIGN_CHUNK):
        hi = min(n, lo + ASSIGN_CHUNK)
        b = np.zeros((hi - lo, n_bytes * per), dtype=np.uint8)
        b[:, :dim] = _buckets(x[lo:hi] - centroids[cids[lo:hi]], cutoffs)
        for i in range(per):
            packed[lo:hi] |= b[:, i::per] << np.uint8(i * bits)
    return packed


# --------------------------------------------------------------------------- merges


def gather(
    parts: Sequence[tuple[CodedTokens, I64, I64]],
    originals: npt.NDArray[np.floating[Any]] | None = None,
) -> CodedTokens:
    """The rows of documents ``docs`` of several coded matrices (``(tokens, offsets, docs)``
    each, at least one), one part after another. The first part that contributes rows is the
    reference (parts without rows contribute nothing and are not compared: an empty segment's
    codebook was trained on nothing): codes are copied (centroid tables concatenated) when
    every contributing part shares its buckets / scale, else encoded again against it — from
    ``originals`` (the same rows as written) where given, else from the decoded codes (which
    quantises them a second time)."""
    assert parts, "nothing to gather"
    pairs = [(t, _doc_rows(offsets, docs)) for t, offsets, docs in parts]
    pairs = [(t, r) for t, r in pairs if len(r)] or pairs[:1]
    reference = pairs[0][0]

    def again() -> F32:
        if originals is not None:
            return widen(originals)
        out: F32 = _concat([t.take(r) for t, r in pairs], (0, reference.shape[1]), np.float32)
        return out

    if isinstance(reference, Int8Tokens):
        int8 = [(t, r) for t, r in pairs if isinstance(t, Int8Tokens)]
        if len(int8) == len(pairs) and all(
            np.array_equal(t.scale, reference.scale) for t, _ in int8
        ):
            codes = [t.codes[r] for t, r in int8]
            return Int8Tokens(_concat(codes, (0, reference.shape[1]), np.int8), reference.scale)
        return _encode_int8(again(), reference)
    same = all(
        isinstance(t, ResidualTokens)
        and t.bits == reference.bits
        and np.array_equal(t.weights, reference.weights)
        and np.array_equal(t.cutoffs, reference.cutoffs)
        for t, _ in pairs
    )
    if not same:
        return _encode_residual(again(), reference.bits, reference, seed=0)
    cids, packed, tables = [], [], []
    base = 0
    for t, r in pairs:
        assert isinstance(t, ResidualTokens)
        used = np.unique(t.cids[r])  # only the centroids the kept rows use
        remap = np.full(len(t.centroids), -1, dtype=np.int64)
        remap[used] = np.arange(len(used)) + base
        cids.append(remap[t.cids[r]].astype(np.int32))
        packed.append(t.packed[r])
        tables.append(t.centroids[used])
        base += len(used)
    return ResidualTokens(
        _concat(cids, (0,), np.int32),
        _concat(packed, (0, reference.packed.shape[1]), np.uint8),
        _concat(tables, (0, reference.dim), np.float32),
        reference.cutoffs,
        reference.weights,
        reference.bits,
    )


def _doc_rows(offsets: I64, docs: I64) -> I64:
    starts = offsets[docs]
    lengths = offsets[docs + 1] - starts
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(
        int(lengths.sum()), dtype=np.int64
    )


def _concat(arrays: list[Any], empty_shape: tuple[int, ...], dtype: Any) -> Any:
    return np.concatenate(arrays) if arrays else np.zeros(empty_shape, dtype=dtype)


# --------------------------------------------------------------------------- files


def write_codebook(directory: Path, vector: str, tokens: CodedTokens) -> None:
    if isinstance(tokens, Int8Tokens):
        np.savez(codec_path(directory, vector), kind=np.array("int8"), scale=tokens.scale)
    else:
        np.savez(
            codec_path(directory, vector),
            kind=np.array("residual"),
            bits=np.array(tokens.bits),
            centroids=tokens.centroids,
            cutoffs=tokens.cutoffs,
            weights=tokens.weights,
        )


def read_coded(directory: Path, vector: str, codes: Any, cids: Any) -> CodedTokens:
    """The coded tokens of a segment: its codebook file plus the (memory-mapped) code rows
    ``codes`` ((n, dim) int8, or (n, n_bytes) uint8) and, for residual, the centroid ids."""
    with np.load(codec_path(directory, vector), allow_pickle=False) as f:
        kind = str(f["kind"])
        if kind == "int8":
            return Int8Tokens(codes, np.asarray(f["scale"], dtype=np.float32))
        return ResidualTokens(
            cids,
            codes,
            np.ascontiguousarray(f["centroids"], dtype=np.float32),
            np.asarray(f["cutoffs"], dtype=np.float32),
            np.asarray(f["weights"], dtype=np.float32),
            int(f["bits"]),
        )
