"""MaxSim (late interaction) scoring, vectorised over many documents at once.

    score(Q, D) = sum over query rows q of  max over document rows d of  <q, d>

Documents travel as one flat token matrix plus ``offsets`` (document ``i`` owns rows
``offsets[i]:offsets[i+1]``). Scoring is one matmul of the tokens with the query, then the max
over each document's rows and the sum over the query rows (compiled, ``shard.kernels``): no
Python loop per document. A chosen few documents of a large matrix are scored where they lie,
one small matmul each, instead of being gathered first. A document with zero rows has no vector
and scores ``-inf`` (it never matches). Scores are float64 (float32 sims
summed in float64), so ordering does not depend on the summation order of the query rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import numpy.typing as npt

from shard.kernels import maxsim_rows, segment_max_sum

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Tokens = npt.NDArray[np.float32] | npt.NDArray[np.float16]

# Similarities scored per block (rows × query tokens): small enough that the (rows, n_query)
# block stays in L2 for the max-reduction, which is then ~4× faster than over one big block.
BLOCK_SIMS = 131_072


# float16 → float32 by bit arithmetic (``widen``): after a shift by 13, the sign-extended int16
# holds the sign in bit 31 (bits 28-30 are copies of it: masked off) and the exponent and
# mantissa in bits 13-27; multiplying by 2^112 moves the exponent bias from 15 to 127, which
# also turns float16 subnormals into the right float32 normals.
_F16_BITS_MASK = np.uint32(0x8FFFE000).view(np.int32)
_F16_REBIAS = np.float32(2.0**112)


def widen(tokens: npt.NDArray[np.floating]) -> F32:
    """``tokens`` as float32: itself when it already is, the same values otherwise.

    float16 (a vector's storage ``dtype``) is widened with four in-place integer/float passes,
    ~8× faster than numpy's float16 cast on this machine kind (0.28 vs 2.2 ms for the 1.34M
    values of 300 re-scored documents). Exact for every finite float16, including subnormals
    and -0.0; Inf/NaN are never stored (ingest rejects them, and values beyond float16's range
    for a float16 vector)."""
    if tokens.dtype == np.float32:
        return cast(F32, tokens)
    if tokens.dtype != np.float16:
        return tokens.astype(np.float32)
    bits = np.ascontiguousarray(tokens).view(np.int16).astype(np.int32)
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _F16_BITS_MASK, out=bits)
    out = bits.view(np.float32)
    out *= _F16_REBIAS
    return cast(F32, out)


def maxsim_reference(query: F32, docs: Sequence[npt.NDArray[np.floating]]) -> F64:
    """Straightforward per-document loop; the tests' ground truth."""
    out = np.full(len(docs), -np.inf, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    for i, doc in enumerate(docs):
        if len(doc) == 0:
            continue
        sims = np.asarray(doc, dtype=np.float64) @ q.T
        out[i] = float(sims.max(axis=0).sum())
    return out


def gather(tokens: Tokens, offsets: I64, docs: I64) -> tuple[Tokens, I64]:
    """Rows of ``docs`` (indices into ``offsets``) as one flat matrix plus new offsets."""
    rows, lengths = gather_many([(tokens, offsets, docs)], tokens.shape[1], tokens.dtype)
    new_offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    return rows, new_offsets


def gather_into(tokens: Tokens, offsets: I64, docs: I64, out: Tokens) -> None:
    """``gather``'s rows written into ``out`` (exactly as many rows as the documents own)."""
    starts = offsets[docs]
    lengths = offsets[docs + 1] - starts
    ends = np.cumsum(lengths)
    idx = np.repeat(starts - (ends - lengths), lengths) + np.arange(len(out), dtype=np.int64)
    # np.take: ~2× faster than tokens[idx]; mode "raise" would buffer the output
    np.take(tokens, idx, axis=0, out=out, mode="clip")


def gather_many(
    parts: Sequence[tuple[Tokens, I64, I64]], dim: int, dtype: npt.DTypeLike
) -> tuple[Tokens, I64]:
    """The rows of documents ``docs`` of several flat token matrices (``(tokens, offsets,
    docs)`` each), one part after another, gathered straight into one new matrix (no copy per
    part plus a concatenation), and every gathered document's row count."""
    lengths = [offsets[docs + 1] - offsets[docs] for _, offsets, docs in parts]
    lengths_all: I64 = (
        np.concatenate(lengths).astype(np.int64, copy=False)
        if lengths
        else np.zeros(0, dtype=np.int64)
    )
    out: Tokens = np.empty((int(lengths_all.sum()), dim), dtype=dtype)
    start = 0
    for (tokens, offsets, docs), n in zip(parts, lengths, strict=True):
        stop = start + int(n.sum())
        if stop > start:
            gather_into(tokens, offsets, docs, out[start:stop])
        start = stop
    return out, lengths_all


def maxsim_docs(query: F32, tokens: Tokens, offsets: I64, docs: I64) -> F64:
    """MaxSim of ``query`` against the documents ``docs`` (indices into ``offsets``).

    float32 tokens are scored where they lie (``shard.kernels.maxsim_rows``: no gather copy);
    float16 ones are gathered and widened first."""
    docs = np.asarray(docs, dtype=np.int64)
    if tokens.dtype == np.float32:
        return maxsim_rows(query, cast(F32, tokens), offsets[docs], offsets[docs + 1])
    gathered, new_offsets = gather(tokens, offsets, docs)
    return maxsim_flat(query, gathered, new_offsets)


def maxsim_flat(query: F32, tokens: Tokens, offsets: I64, chunk_tokens: int | None = None) -> F64:
    """MaxSim of ``query`` against every document of a flat token matrix.

    Works block by block (``chunk_tokens`` rows, default from ``BLOCK_SIMS``). ``tokens`` may be
    float16 (storage dtype): it is converted block by block.
    """
    n_docs = len(offsets) - 1
    scores = np.full(n_docs, -np.inf, dtype=np.float64)
    if n_docs == 0 or query.shape[0] == 0:
        return scores
    if chunk_tokens is None:
        chunk_tokens = min(16_384, max(1_024, BLOCK_SIMS // query.shape[0]))
    q = np.ascontiguousarray(query, dtype=np.float32)
    doc = 0
    while doc < n_docs:
        # Largest run of documents starting at `doc` whose rows fit one chunk (at least one doc).
        limit = int(offsets[doc]) + chunk_tokens
        end = int(np.searchsorted(offsets, limit, side="right")) - 1
        end = min(max(end, doc + 1), n_docs)
        _score_block(q, tokens, offsets[doc : end + 1], scores[doc:end])
        doc = end
    return scores


def _score_block(query: F32, tokens: Tokens, offsets: I64, out: F64) -> None:
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return
    block = widen(tokens[lo:hi])
    # (rows, n_query): measured ~25 % faster single-threaded than query @ block.T with the
    # reduction along contiguous rows, once the block fits L2 (BLOCK_SIMS).
    sims = block @ query.T
    # The max over each document's rows and the sum over the query rows (compiled: ~8× faster
    # than maximum.reduceat over the document boundaries); an empty document stays -inf.
    segment_max_sum(sims, offsets - lo, out)


def maxsim_explain(query: F32, doc: npt.NDArray[np.floating]) -> list[dict[str, float | int]]:
    """Per query token: the best-matching document token and its similarity."""
    if len(doc) == 0:
        return []
    sims = np.asarray(doc, dtype=np.float32) @ np.asarray(query, dtype=np.float32).T
    best = sims.argmax(axis=0)
    return [
        {"query_token": i, "doc_token": int(j), "sim": float(sims[j, i])}
        for i, j in enumerate(best)
    ]


def top_k_order(scores: F64, k: int, key_of: Callable[[int], str]) -> I64:
    """Indices of the ``k`` best entries: score descending, then key ascending.

    ``key_of(i)`` is the tie-break key (the uuid), asked only for entries near the top.
    Ties at the cut are resolved by key too (all entries tied with the k-th score are considered).
    ``-inf`` scores (no vector / excluded) never make the list.
    """
    finite = np.flatnonzero(np.isfinite(scores))
    if k <= 0 or len(finite) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(finite) > k:
        kth = np.partition(scores[finite], len(finite) - k)[len(finite) - k]
        finite = finite[scores[finite] >= kth]
    chosen = sorted(finite.tolist(), key=lambda i: (-scores[i], key_of(i)))[:k]
    return np.asarray(chosen, dtype=np.int64)
