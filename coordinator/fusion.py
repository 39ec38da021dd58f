"""Hybrid fusion: a keyword (BM25) top list and a vector top list become one ranked list.

Inputs are ``(uuid, score)`` lists already merged across shards, best first, higher = better
(a uuid appearing twice in one list keeps its first, best, entry). ``alpha`` weighs the vector
side: 0 = keyword only, 1 = vector only. Two fusions, as Weaviate defines them:

- ``ranked`` (reciprocal rank fusion): ``score = alpha / (60 + rank_v) + (1 - alpha) /
  (60 + rank_k)`` with 0-based ranks (Weaviate's rankedFusion); a list the hit is absent from
  adds nothing.
- ``relative_score``: each list is min-max normalised to [0, 1] (``(s - min) / (max - min)``;
  a list whose scores are all equal, e.g. a single hit, normalises every hit to 1), then
  ``score = alpha * norm_v + (1 - alpha) * norm_k`` (Weaviate's relativeScoreFusion).

Output is sorted by fused score descending, then uuid, and ``offset``/``limit`` are applied
once. A side whose weight is 0 is not consulted at all, so alpha 0 returns exactly the keyword
list (order included) and alpha 1 exactly the vector list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from cluster.errors import InvalidInput

FusionKind = Literal["ranked", "relative_score"]
FUSIONS: Final[tuple[str, ...]] = get_args(FusionKind)
RRF_K: Final = 60
DEFAULT_ALPHA: Final = 0.75
DEFAULT_FUSION: Final[FusionKind] = "relative_score"

Ranked = Sequence[tuple[str, float]]


@dataclass(frozen=True)
class FusedHit:
    """One fused hit. Ranks are 0-based positions in the input lists; None = not in that list
    (or the list was not consulted because its weight is 0). Scores are the raw input scores."""

    uuid: str
    score: float
    keyword_score: float | None = None
    vector_score: float | None = None
    keyword_rank: int | None = None
    vector_rank: int | None = None


def fuse(
    keyword: Ranked,
    vector: Ranked,
    *,
    alpha: float = DEFAULT_ALPHA,
    fusion: FusionKind = DEFAULT_FUSION,
    offset: int = 0,
    limit: int | None = None,
) -> list[FusedHit]:
    """Fuse the two top lists; see the module docstring for the formulas."""
    _validate(alpha, fusion, offset, limit)
    kw = _dedupe(keyword, "keyword") if alpha < 1 else []
    vec = _dedupe(vector, "vector") if alpha > 0 else []
    kw_part = _contributions(kw, 1 - alpha, fusion)
    vec_part = _contributions(vec, alpha, fusion)
    kw_at = {u: (rank, score) for rank, (u, score) in enumerate(kw)}
    vec_at = {u: (rank, score) for rank, (u, score) in enumerate(vec)}
    hits = []
    for u in dict.fromkeys([u for u, _ in kw] + [u for u, _ in vec]):
        k, v = kw_at.get(u), vec_at.get(u)
        hits.append(
            FusedHit(
                uuid=u,
                score=kw_part.get(u, 0.0) + vec_part.get(u, 0.0),
                keyword_score=None if k is None else k[1],
                vector_score=None if v is None else v[1],
                keyword_rank=None if k is None else k[0],
                vector_rank=None if v is None else v[0],
            )
        )
    if 0 < alpha < 1:
        hits.sort(key=lambda h: (-h.score, h.uuid))
    # else: one list alone, already in its own order (normalising must not reshuffle ties)
    end = None if limit is None else offset + limit
    return hits[offset:end]


def _validate(alpha: float, fusion: str, offset: int, limit: int | None) -> None:
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or not 0 <= alpha <= 1
    ):
        raise InvalidInput(f"alpha must be a number in [0, 1], got {alpha!r}", {"alpha": alpha})
    if fusion not in FUSIONS:
        raise InvalidInput(
            f"fusion must be one of {list(FUSIONS)}, got {fusion!r}", {"fusion": fusion}
        )
    if offset < 0 or (limit is not None and limit < 0):
        raise InvalidInput(
            "offset and limit must not be negative", {"offset": offset, "limit": limit}
        )


def _dedupe(hits: Ranked, side: str) -> list[tuple[str, float]]:
    out: dict[str, float] = {}
    for u, score in hits:
        if not math.isfinite(score):
            raise ValueError(f"{side} list: non-finite score {score!r} for {u}")
        out.setdefault(u, float(score))
    return list(out.items())


def _contributions(
    hits: list[tuple[str, float]], weight: float, fusion: FusionKind
) -> dict[str, float]:
    """Each hit's weighted share of the fused score from one list."""
    if not hits:
        return {}
    if fusion == "ranked":
        return {u: weight / (RRF_K + rank) for rank, (u, _) in enumerate(hits)}
    scores = [s for _, s in hits]
    low, high = min(scores), max(scores)
    if high == low:
        return {u: weight for u, _ in hits}
    if not math.isfinite(high - low):  # only for scores near the float limits: halve exactly
        return _contributions([(u, s / 2) for u, s in hits], weight, fusion)
    span = high - low
    return {u: weight * ((s - low) / span) for u, s in hits}
