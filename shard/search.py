"""The search path over a snapshot of segments: candidates, then exact MaxSim, per segment.

For one named vector and one query (all query tokens at once):

1. **Eligibility** per segment: not tombstoned, has rows for this vector, passes the filter's
   allow-list. A filtered segment with few eligible objects (``EXACT_FILTER_MAX_OBJECTS``) and
   every segment without a token index (growing, small, not yet indexed) is scored exactly.
2. **Candidates** from the token indexes, as if the indexed segments were one index: segment
   ``s`` is probed for its share of k' (``k'·n_s/N`` plus three standard deviations, or exactly
   k' when it is the only one), ineligible tokens are dropped, and a per-query-token threshold
   ``τ`` = the k'-th best similarity over all segments keeps the shard-wide top k' tokens. A
   segment whose last probed similarity still beats ``τ`` may hold more of the top k' (imports
   sorted by topic make segments uneven): those query tokens are probed again, 4× deeper. Filters
   and tombstones raise the per-segment k' in proportion to what they remove (at most
   ``MAX_KPRIME_BOOST``×), and if the candidates still cannot fill k, the exact path is taken.
3. **Exact MaxSim** on the candidates' full token matrices (shard.maxsim), top k per segment
   (score desc, uuid asc). The engine merges the segments' lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shard.maxsim import maxsim_docs, maxsim_flat, top_k_order
from shard.segment import SegmentView, VectorView

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

# With a filter, segments with at most this many allowed objects are scored exactly.
EXACT_FILTER_MAX_OBJECTS = 2048
# Largest factor by which k' grows when filters/tombstones leave few eligible objects.
MAX_KPRIME_BOOST = 16.0
# Deeper probes (4× each) for segments whose hit lists were cut above the threshold.
MAX_WIDENINGS = 2


@dataclass(frozen=True)
class SegmentHits:
    view: SegmentView
    rows: I64  # best first
    scores: F64
    n_candidates: int  # objects scored exactly


@dataclass
class _Plan:
    view: SegmentView
    vec: VectorView
    eligible: Bools
    n_eligible: int
    n_with_rows: int
    use_index: bool


@dataclass
class _Probe:
    plan: _Plan
    kp: int
    ids: I64  # (n_query, kp) token ids, -1 padding
    sims: F32  # (n_query, kp), -inf for padding and ineligible tokens
    last: F32  # (n_query,) the kp-th raw similarity (before eligibility), -inf if padded


def search_segments(views: Sequence[SegmentView], vector: str, query: F32, k: int, *,
                    allowed: Sequence[Bools | None], k_prime: int) -> list[SegmentHits]:
    """Per segment: its top ``k`` (rows, exact MaxSim scores). See the module docstring."""
    if k <= 0:
        return []
    plans = []
    for view, allow in zip(views, allowed, strict=True):
        vec = view.vectors.get(vector)
        if vec is None or view.n_objects == 0:
            continue
        has_rows = np.diff(vec.offsets) > 0
        eligible = ~view.deleted & has_rows
        if allow is not None:
            eligible &= allow
        n_eligible = int(np.count_nonzero(eligible))
        if n_eligible == 0:
            continue
        use_index = vec.index is not None and vec.tok2doc is not None and not (
            allow is not None and n_eligible <= EXACT_FILTER_MAX_OBJECTS)
        plans.append(_Plan(view, vec, eligible, n_eligible, int(np.count_nonzero(has_rows)),
                           use_index))
    candidates = _ann_candidates([p for p in plans if p.use_index], query, k, k_prime)
    out = []
    for plan in plans:
        rows = candidates.get(id(plan))
        if rows is None:
            rows = np.flatnonzero(plan.eligible).astype(np.int64)
        out.append(_exact_top(plan, query, rows, k))
    return out


def _ann_candidates(plans: list[_Plan], query: F32, k: int, k_prime: int) -> dict[int, I64]:
    """Candidate rows per indexed plan (keyed by ``id(plan)``); empty dict = score exactly."""
    if not plans:
        return {}
    n_total = sum(_n_tokens(p) for p in plans)
    probes = []
    for p in plans:
        n = _n_tokens(p)
        if len(plans) == 1:
            share = float(k_prime)
        else:
            mean = k_prime * n / n_total
            share = mean + 3.0 * math.sqrt(mean) + 1.0
        boost = min(MAX_KPRIME_BOOST, p.n_with_rows / p.n_eligible)
        probes.append(_probe(p, query, min(n, math.ceil(share * boost))))
    tau = _threshold(probes, k_prime)
    for _ in range(MAX_WIDENINGS):
        widened = False
        for i, pr in enumerate(probes):
            short = pr.last > tau  # cut while still above the shard-wide threshold
            if pr.kp < _n_tokens(pr.plan) and short.any():
                probes[i] = _widen(pr, query, short)
                widened = True
        if not widened:
            break
        tau = _threshold(probes, k_prime)
    out: dict[int, I64] = {}
    for pr in probes:
        keep = np.isfinite(pr.sims) & (pr.sims >= tau[:, None])
        tok2doc = pr.plan.vec.tok2doc
        assert tok2doc is not None
        out[id(pr.plan)] = np.unique(tok2doc[pr.ids[keep]]).astype(np.int64)
    n_found = sum(len(r) for r in out.values())
    if n_found < min(k, sum(p.n_eligible for p in plans)):
        return {}  # filters/tombstones left too few: exact over the eligible objects
    return out


def _n_tokens(plan: _Plan) -> int:
    assert plan.vec.index is not None
    return plan.vec.index.n_tokens


def _probe(plan: _Plan, query: F32, kp: int) -> _Probe:
    assert plan.vec.index is not None and plan.vec.tok2doc is not None
    ids, sims = plan.vec.index.search(query, kp)
    last = sims[:, -1].copy()
    valid = ids >= 0
    ok = valid.copy()
    ok[valid] = plan.eligible[plan.vec.tok2doc[ids[valid]]]
    sims[~ok] = -np.inf
    return _Probe(plan, ids.shape[1], ids, sims, last)


def _widen(pr: _Probe, query: F32, rows: Bools) -> _Probe:
    """Probe again, 4× deeper, for the query tokens in ``rows``; keep the others' hits."""
    deeper = _probe(pr.plan, query[rows], min(_n_tokens(pr.plan), 4 * pr.kp))
    width = deeper.ids.shape[1]
    ids = np.full((len(query), width), -1, dtype=np.int64)
    sims = np.full((len(query), width), -np.inf, dtype=np.float32)
    ids[:, : pr.ids.shape[1]] = pr.ids
    sims[:, : pr.sims.shape[1]] = pr.sims
    ids[rows], sims[rows] = deeper.ids, deeper.sims
    last = pr.last.copy()
    last[rows] = deeper.last
    last[~rows] = -np.inf  # those rows were complete already
    return _Probe(pr.plan, width, ids, sims, last)


def _threshold(probes: list[_Probe], k_prime: int) -> F32:
    """Per query token: the k'-th best eligible similarity over all probes (-inf if fewer)."""
    sims = np.concatenate([pr.sims for pr in probes], axis=1)
    if sims.shape[1] <= k_prime:
        return np.full(sims.shape[0], -np.inf, dtype=np.float32)
    cut = sims.shape[1] - k_prime
    tau: F32 = np.partition(sims, cut, axis=1)[:, cut]
    return tau


def _exact_top(plan: _Plan, query: F32, rows: I64, k: int) -> SegmentHits:
    vec = plan.vec
    if len(rows) * 2 > plan.view.n_objects:
        # Most of the segment: score it in place (no gather copy) and pick the rows.
        scores = maxsim_flat(query, vec.tokens, vec.offsets)[rows]
    else:
        scores = maxsim_docs(query, vec.tokens, vec.offsets, rows)
    uuids = plan.view.segment.uuids
    order = top_k_order(scores, k, lambda i: uuids[int(rows[i])])
    return SegmentHits(plan.view, rows[order], scores[order], len(rows))
