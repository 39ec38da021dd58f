"""Recall of an approximate search against exact MaxSim: the statistics both the shards'
calibration (shard.calibrate) and the coordinator's recall report use, and a vector's target."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

# One-sided 95 % normal quantile: the lower bound of mean recall that must reach the target.
Z_LOWER = 1.645
DEFAULT_TARGET_RECALL = 0.95
RECALL_KS: tuple[int, ...] = (10, 100)
TARGET_RECALL_RANGE = (0.5, 0.999)


def target_of(options: Mapping[str, Any]) -> tuple[float, int]:
    """``(target_recall, recall_k)`` of a vector's index options (validated in cluster.spec)."""
    return (
        float(options.get("target_recall", DEFAULT_TARGET_RECALL)),
        int(options.get("recall_k", RECALL_KS[0])),
    )


def recall_at(found: Sequence[float] | F64, truth: Sequence[float] | F64, k: int) -> float:
    """recall@k of one query: the share of the exact top k (``truth``: exact scores, best
    first) that ``found`` (the exact scores of the returned hits) reaches. A hit scoring at
    least the k-th exact score counts (ties at the cut are not misses); 1.0 when nothing is
    eligible."""
    truth = np.asarray(truth, dtype=np.float64)[:k]
    if len(truth) == 0:
        return 1.0
    kth = float(truth[-1])
    tol = 1e-5 * max(1.0, abs(kth))
    hits = int(np.count_nonzero(np.asarray(found, dtype=np.float64)[:k] >= kth - tol))
    return min(hits, len(truth)) / len(truth)


def interval(recalls: Sequence[float] | F64) -> tuple[float, float, float]:
    """``(mean, low, high)``: mean recall and its one-sided 95 % bounds (normal approximation;
    with one query the bounds are 0 and 1)."""
    r = np.asarray(recalls, dtype=np.float64)
    if len(r) == 0:
        return 0.0, 0.0, 1.0
    mean = float(r.mean())
    if len(r) < 2:
        return mean, 0.0, 1.0
    half = Z_LOWER * float(r.std(ddof=1)) / math.sqrt(len(r))
    return mean, max(0.0, mean - half), min(1.0, mean + half)
