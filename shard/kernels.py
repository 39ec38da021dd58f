"""Compiled (numba) kernels for the exact MaxSim re-score and the candidate scores.

numpy scores many documents with one matmul over their tokens gathered into one matrix, then a
``maximum.reduceat`` over the document boundaries. Two of those steps cost more than the
arithmetic on this machine kind (small collection, 300 documents of ~35 tokens re-scored per
query, one thread): the gather copies ~5 MB of rows out of the memory-mapped segment (~0.8 ms),
and ``reduceat`` takes ~0.4 ms for 300 boundaries × 32 query rows. Here:

- ``maxsim_rows`` scores documents straight from the (memory-mapped) token matrix: one small
  BLAS matmul per document on its own contiguous rows (numba calls scipy's BLAS, without
  Python in between), then the max and the sum — no gather copy;
- ``segment_max_sum`` is the max-then-sum over document boundaries of a similarity block;
- ``HitTable`` scores candidate documents from their token-index hits (the imputation rule of
  ``shard.search.impute_scores``) in two passes over the kept hits.

The kernels release the GIL. They are compiled on first use and cached on disk (numba's cache:
beside this file, else the user's cache directory, or ``NUMBA_CACHE_DIR``); where none of those
is writable (a read-only image with a read-only home) they are compiled in each process
instead, ~1 s.
``warm()`` does it ahead of the first query.

Scores match the numpy path: the same float32 dot products, maxima summed in float64 in query
row order. NaN never reaches them (ingest and queries reject it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def _jit(fn: Callable[..., Any]) -> Any:
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True)(fn)


def _rows_max_sum_py(sims: F32, lo: int, hi: int, best: F32) -> float:
    """Sum over columns of the column-wise max of ``sims[lo:hi]`` (``hi > lo``); ``best`` is
    scratch space of one row."""
    n_query = sims.shape[1]
    for j in range(n_query):
        best[j] = sims[lo, j]
    for r in range(lo + 1, hi):
        for j in range(n_query):
            v = sims[r, j]
            if v > best[j]:
                best[j] = v
    total = 0.0
    for j in range(n_query):
        total += best[j]
    return total


def _maxsim_rows_py(tokens: F32, starts: I64, ends: I64, qt: F32, out: F64) -> None:
    best = np.empty(qt.shape[1], np.float32)
    for d in range(len(starts)):
        lo = starts[d]
        hi = ends[d]
        if hi > lo:  # else no vector: stays -inf
            out[d] = _rows_max_sum(np.dot(tokens[lo:hi], qt), 0, hi - lo, best)


def _segment_max_sum_py(sims: F32, offsets: I64, out: F64) -> None:
    best = np.empty(sims.shape[1], np.float32)
    for d in range(len(offsets) - 1):
        if offsets[d + 1] > offsets[d]:
            out[d] = _rows_max_sum(sims, offsets[d], offsets[d + 1], best)


def _kept_hits_py(
    ids: I64,
    sims: F32,
    tau: F32,
    tok2doc: npt.NDArray[np.integer],
    base: int,
    keys: I64,
    rows: I64,
    kept: F64,
) -> int:
    """Writes every kept hit (finite, not below its query row's ``tau``) as (document key
    ``base + tok2doc[id]``, query row, similarity); returns how many."""
    n_query, width = ids.shape
    n = 0
    for q in range(n_query):
        t = tau[q]
        for j in range(width):
            s = sims[q, j]
            if s >= t and -np.inf < s < np.inf:
                keys[n] = tok2doc[ids[q, j]] + base
                rows[n] = q
                kept[n] = s
                n += 1
    return n


def _add_hits_py(
    slots: I64,
    rows: I64,
    kept: F64,
    imputed: F64,
    spread: F64,
    shift: F64,
    last_row: I64,
    best_hit: F64,
    approx: F64,
) -> None:
    for i in range(len(slots)):
        slot = slots[i]
        q = rows[i]
        hit = kept[i]
        imp = imputed[q] + shift[slot] * spread[q]
        if last_row[slot] != q:  # the document's first hit for this query row
            last_row[slot] = q
            best_hit[slot] = hit
            if hit > imp:
                approx[slot] += hit - imp
        elif hit > best_hit[slot]:  # a better hit for the same row: only the best counts
            before = best_hit[slot] if best_hit[slot] > imp else imp
            best_hit[slot] = hit
            if hit > before:
                approx[slot] += hit - before


def _decode_int8_py(codes: Any, scale: F32, idx: I64, out: F32) -> None:
    dim = codes.shape[1]
    for r in range(len(idx)):
        t = idx[r]
        for d in range(dim):
            out[r, d] = np.float32(codes[t, d]) * scale[d]


def _residual_rows_py(
    cids: Any, packed: Any, centroids: F32, table: F32, t0: int, n: int, out: F32
) -> None:
    """Decodes tokens ``t0 … t0+n-1`` into rows ``0 … n-1`` of ``out`` (padded width
    ``n_bytes · per``): centroid + the residual values of every packed byte, 4 (2-bit) or 2
    (4-bit) at a time from the flattened byte table ``table[p·256 + byte]``."""
    n_bytes = packed.shape[1]
    per = table.shape[1]
    for r in range(n):
        t = t0 + r
        c = cids[t]
        for p in range(n_bytes):
            k = p * 256 + packed[t, p]
            j = p * per
            if per == 4:
                out[r, j] = centroids[c, j] + table[k, 0]
                out[r, j + 1] = centroids[c, j + 1] + table[k, 1]
                out[r, j + 2] = centroids[c, j + 2] + table[k, 2]
                out[r, j + 3] = centroids[c, j + 3] + table[k, 3]
            else:
                out[r, j] = centroids[c, j] + table[k, 0]
                out[r, j + 1] = centroids[c, j + 1] + table[k, 1]


def _decode_residual_py(
    cids: Any, packed: Any, centroids: F32, table: F32, idx: I64, out: F32
) -> None:
    for r in range(len(idx)):
        _residual_rows(cids, packed, centroids, table, idx[r], 1, out[r : r + 1])


def _longest_py(starts: I64, ends: I64) -> int:
    """The most rows of one document (at least 1): the coded kernels' scratch block."""
    longest = 1
    for d in range(len(starts)):
        longest = max(longest, ends[d] - starts[d])
    return longest


def _maxsim_int8_py(codes: Any, starts: I64, ends: I64, qt: F32, out: F64) -> None:
    dim = codes.shape[1]
    scratch = np.empty((_longest(starts, ends), dim), np.float32)
    best = np.empty(qt.shape[1], np.float32)
    for d in range(len(starts)):
        lo = starts[d]
        hi = ends[d]
        if hi > lo:
            for r in range(hi - lo):
                for j in range(dim):
                    scratch[r, j] = np.float32(codes[lo + r, j])
            out[d] = _rows_max_sum(np.dot(scratch[: hi - lo], qt), 0, hi - lo, best)


def _maxsim_residual_py(
    cids: Any,
    packed: Any,
    centroids: F32,
    table: F32,
    starts: I64,
    ends: I64,
    qt: F32,
    out: F64,
) -> None:
    width = packed.shape[1] * table.shape[1]
    scratch = np.empty((_longest(starts, ends), width), np.float32)
    best = np.empty(qt.shape[1], np.float32)
    for d in range(len(starts)):
        lo = starts[d]
        hi = ends[d]
        if hi > lo:
            _residual_rows(cids, packed, centroids, table, lo, hi - lo, scratch)
            out[d] = _rows_max_sum(np.dot(scratch[: hi - lo], qt), 0, hi - lo, best)


_rows_max_sum = _jit(_rows_max_sum_py)
_longest = _jit(_longest_py)
_decode_int8 = _jit(_decode_int8_py)
_residual_rows = _jit(_residual_rows_py)
_decode_residual = _jit(_decode_residual_py)
_maxsim_int8 = _jit(_maxsim_int8_py)
_maxsim_residual = _jit(_maxsim_residual_py)
_maxsim_rows = _jit(_maxsim_rows_py)
_kept_hits = _jit(_kept_hits_py)
_add_hits = _jit(_add_hits_py)
_segment_max_sum = _jit(_segment_max_sum_py)


def maxsim_rows(query: F32, tokens: F32, starts: I64, ends: I64) -> F64:
    """MaxSim of ``query`` (n_query, dim) against the documents owning rows
    ``starts[i]:ends[i]`` of ``tokens`` (float32, (n_rows, dim)); ``-inf`` for an empty one."""
    out = np.full(len(starts), -np.inf, dtype=np.float64)
    if len(starts) == 0 or query.shape[0] == 0:
        return out
    qt = np.ascontiguousarray(np.asarray(query, dtype=np.float32).T)
    _maxsim_rows(
        np.ascontiguousarray(tokens),
        np.ascontiguousarray(starts, dtype=np.int64),
        np.ascontiguousarray(ends, dtype=np.int64),
        qt,
        out,
    )
    return out


def decode_int8(codes: Any, scale: F32, idx: I64, out: F32) -> None:
    """``out[r] = codes[idx[r]] · scale`` (int8 codec rows, decoded)."""
    _decode_int8(codes, scale, idx, out)


def decode_residual(cids: Any, packed: Any, centroids: F32, table: F32, idx: I64, out: F32) -> None:
    """``out[r]`` = centroid + residual of token ``idx[r]`` (residual codec rows, decoded).
    ``table[p·256 + byte]``: the ``per`` residual values packed byte ``p`` holds; ``centroids``
    and ``out`` are as wide as the packed bytes hold values (``n_bytes · per``)."""
    _decode_residual(cids, packed, centroids, table, idx, out)


def maxsim_coded(
    query: F32,
    starts: I64,
    ends: I64,
    *,
    int8: Any = None,
    residual: tuple[Any, Any, F32, F32] | None = None,
) -> F64:
    """``maxsim_rows`` on coded tokens (shard.tokencodec): each document's rows are decoded
    into a scratch block (the longest document's size) and scored with one matmul. ``int8``:
    the codes, with the scale already folded into ``query``; ``residual``: (centroid ids,
    packed buckets, centroids, byte table) as ``decode_residual`` takes them, and ``query``
    as wide as the centroids (zero columns for padding)."""
    out = np.full(len(starts), -np.inf, dtype=np.float64)
    if len(starts) == 0 or query.shape[0] == 0:
        return out
    qt = np.ascontiguousarray(np.asarray(query, dtype=np.float32).T)
    s = np.ascontiguousarray(starts, dtype=np.int64)
    e = np.ascontiguousarray(ends, dtype=np.int64)
    if int8 is not None:
        _maxsim_int8(int8, s, e, qt, out)
    else:
        assert residual is not None
        cids, packed, centroids, lut = residual
        _maxsim_residual(cids, packed, centroids, lut, s, e, qt, out)
    return out


def segment_max_sum(sims: F32, offsets: I64, out: F64) -> None:
    """``out[i]`` = the sum over columns of the column-wise max of ``sims`` rows
    ``offsets[i]:offsets[i+1]`` (float64); left as it is for an empty range."""
    _segment_max_sum(
        np.ascontiguousarray(sims, dtype=np.float32),
        np.ascontiguousarray(offsets, dtype=np.int64),
        out,
    )


def unique_keys(keys: I64, n_keys: int) -> tuple[I64, I64]:
    """``np.unique(keys, return_inverse=True)`` for keys in ``range(n_keys)``; by marking a
    dense table when the key space is small next to the keys (sorting 20k hits costs ~10× more
    than marking 20k slots), by sorting when it is not (a table per query would cost its size)."""
    if n_keys > 16 * len(keys) + 65_536:
        u, inv = np.unique(keys, return_inverse=True)
        return u.astype(np.int64), inv.reshape(-1).astype(np.int64)
    seen = np.zeros(n_keys, dtype=np.bool_)
    seen[keys] = True
    u = np.flatnonzero(seen)
    pos = np.empty(n_keys, dtype=np.int64)
    pos[u] = np.arange(len(u), dtype=np.int64)
    return u.astype(np.int64), pos[keys]


class HitTable:
    """Approximate document scores from token-index hits (XTR-style imputation, see
    ``shard.search.impute_scores`` for the rule), compiled: no (documents × query rows)
    matrix. Documents are keys ``base + row`` in ``range(n_keys)``; hits come as ``(ids,
    sims)`` blocks of (n_query, width) with a token → row table each, and count where ``sims``
    is finite and at least ``tau`` of their query row.

    ``mark`` every block, then ``documents()`` (ascending keys), then ``scores`` with the
    per-row imputed values and per-document shifts."""

    def __init__(self, n_keys: int, tau: F32) -> None:
        self._n_keys = n_keys
        self._tau = np.ascontiguousarray(tau, dtype=np.float32)
        self._hits: list[tuple[I64, I64, F64]] = []  # kept (keys, query rows, similarities)
        self._docs: tuple[I64, I64] | None = None  # (documents, slot of every kept hit)

    def mark(self, ids: I64, sims: F32, tok2doc: npt.NDArray[np.integer], base: int) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        keys = np.empty(ids.size, dtype=np.int64)
        rows = np.empty(ids.size, dtype=np.int64)
        kept = np.empty(ids.size, dtype=np.float64)
        n = _kept_hits(
            ids,
            np.ascontiguousarray(sims, dtype=np.float32),
            self._tau,
            np.ascontiguousarray(tok2doc),
            int(base),  # int32 in segments: no copy
            keys,
            rows,
            kept,
        )
        self._hits.append((keys[:n], rows[:n], kept[:n]))
        self._docs = None

    def _documents(self) -> tuple[I64, I64]:
        if self._docs is None:
            keys = (
                np.concatenate([h[0] for h in self._hits])
                if self._hits
                else np.zeros(0, dtype=np.int64)
            )
            self._docs = unique_keys(keys, self._n_keys)
        return self._docs

    def documents(self) -> I64:
        return self._documents()[0]

    def scores(self, imputed: F32, spread: F32, shift: F32) -> F64:
        """Per document of ``documents()``: the sum over query rows of its best hit, or of the
        imputed value ``imputed[row] + shift[document] * spread[row]`` where that is higher
        (or it has no hit)."""
        docs, slots = self._documents()
        imputed64 = np.asarray(imputed, dtype=np.float64)
        spread64 = np.asarray(spread, dtype=np.float64)
        shift64 = np.ascontiguousarray(shift, dtype=np.float64)
        approx: F64 = np.ascontiguousarray(imputed64.sum() + shift64 * spread64.sum())
        if not self._hits:
            return approx
        if len(self._hits) == 1:
            rows, kept = self._hits[0][1], self._hits[0][2]
        else:
            rows = np.concatenate([h[1] for h in self._hits])
            kept = np.concatenate([h[2] for h in self._hits])
        _add_hits(
            slots,
            rows,
            kept,
            imputed64,
            spread64,
            shift64,
            np.full(len(docs), -1, dtype=np.int64),
            np.empty(len(docs)),
            approx,
        )
        return approx


def warm() -> None:
    """Compile (or load from the cache) the kernels for the argument types searches use."""
    tokens = np.zeros((4, 2), dtype=np.float32)
    query = np.ones((2, 2), dtype=np.float32)
    maxsim_rows(query, tokens, np.array([0, 2]), np.array([2, 4]))
    segment_max_sum(tokens, np.array([0, 2, 4]), np.zeros(2))
    table = HitTable(2, np.full(1, -np.inf, dtype=np.float32))
    table.mark(
        np.zeros((1, 1), dtype=np.int64),
        np.ones((1, 1), dtype=np.float32),
        np.zeros(1, dtype=np.int32),
        0,
    )
    table.scores(np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32))
    # the lossy codecs' kernels (shard.tokencodec), for the array types a sealed segment has:
    # read-only memory-mapped codes
    codes = np.zeros((4, 2), dtype=np.int8)
    codes.flags.writeable = False
    idx, out = np.arange(4, dtype=np.int64), np.empty((4, 2), dtype=np.float32)
    scale = np.ones(2, dtype=np.float32)
    decode_int8(codes, scale, idx, out)
    maxsim_coded(query, np.array([0, 2]), np.array([2, 4]), int8=codes)
    cids = np.zeros(4, dtype=np.int32)
    packed = np.zeros((4, 1), dtype=np.uint8)
    cids.flags.writeable = packed.flags.writeable = False
    centroids, lut = np.zeros((1, 2), dtype=np.float32), np.zeros((256, 2), dtype=np.float32)
    decode_residual(cids, packed, centroids, lut, idx, out)
    maxsim_coded(query, np.array([0, 2]), np.array([2, 4]), residual=(cids, packed, centroids, lut))
