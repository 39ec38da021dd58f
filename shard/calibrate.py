"""Recall calibration: each shard measures its own recall@k and picks the cheapest search depth
that meets the vector's target (``index.target_recall``, at k = ``index.recall_k``).

The search's candidate budget (k' hits per query token, documents re-scored exactly, MUVERA
FDE candidates) is the configured value × the size scaling of ``shard.search.scaled_candidates``
× a **depth** factor from the ladder ``DEPTHS``; the cost grows with the depth and so (up to
sampling noise) does recall. Calibration, given a snapshot of the shard:

1. draws a sample of queries: recent real queries from the shard's reservoir (``Reservoir``;
   as many as it holds, up to the sample size) and synthetic ones built from stored
   objects (``synthetic_queries``: a random share of one object's tokens, the rest from another
   object, each with fresh noise of a random size, 4–40 tokens long, or as long as the real
   queries seen);
2. computes their exact top k by MaxSim over every live object (the truth);
3. searches the ladder (``choose_depth``, one rung at a time from 1, assuming recall grows
   with depth) for the smallest depth whose *lower* confidence bound on mean recall@k
   (one-sided 95 %, normal approximation over the per-query recalls; ``cluster.recall``)
   reaches the target: a margin for the sampling error that shrinks with the sample size. If
   even the deepest setting does not reach it, that one is kept and the calibration says
   ``met: false``.

A hit counts as found when its exact score reaches the k-th exact score (ties at the cut,
e.g. exact duplicates, are not misses: ``cluster.recall.recall_at``). The result
(``Calibration``) is persisted with the shard (``calibration.json``) and shown in its stats;
the engine decides when to run it (shard.engine: after index builds and merges once the shard
is idle, when the shard grew by ``RECALIBRATE_GROWTH``, once the reservoir fills with real
queries).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.recall import interval

F32 = npt.NDArray[np.float32]

# Search depth factors, cheapest first (√2 steps). 1.0 is the configured setting.
DEPTHS: tuple[float, ...] = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.3, 16.0)
# Lengths of synthetic queries when no real query has been seen (log-uniform).
SYNTH_MIN_LEN, SYNTH_MAX_LEN = 4, 40
# Relative noise added to each synthetic query token (uniform per query): ‖noise‖ ≈ σ·‖token‖.
SYNTH_NOISE = (0.3, 0.8)
# Share of a synthetic query's tokens taken from its source object (uniform per query); the
# others come from a second, random object. Measured on the benchmark's small set at the
# default depth: such queries get recall@10 ≈ 0.90, the benchmark's own queries 0.977 -- the
# synthetic sample errs on the safe side until real queries replace it.
SYNTH_FROM_SOURCE = (0.75, 1.0)
# A shard that is not idle (writes arriving) calibrates at most this often.
BUSY_CALIBRATE_S = 60.0
# An idle shard recalibrates when its tokens changed by this fraction (or its index did).
RECALIBRATE_IDLE_CHANGE = 0.05
# Recalibrate when the shard's tokens changed by this fraction since the last calibration.
RECALIBRATE_GROWTH = 0.25
# Real queries kept per vector; a calibration's sample takes as many of them as it can (the
# rest synthetic), and the shard recalibrates once it has RESERVOIR_MIN of them, and again
# whenever it could use twice as many as last time.
RESERVOIR_SIZE = 256
RESERVOIR_MIN = 64


@dataclass(frozen=True)
class Calibration:
    """One vector's calibration on one shard."""

    vector: str
    k: int
    target: float
    depth: float  # the chosen factor on the search's candidate budget
    recall: float  # mean recall@k of the sample at ``depth``
    ci_low: float  # one-sided 95 % lower bound (the value compared with the target)
    ci_high: float  # the matching upper bound
    queries: int  # sample size
    real_queries: int  # of them from the reservoir of real queries
    met: bool  # ci_low >= target
    n_tokens: int  # live tokens of the vector when measured
    segments: tuple[int, ...]  # indexed segments it was measured on
    at: float  # Unix time
    seconds: float  # wall time
    cpu_s: float  # CPU time of the calibrating thread
    tried: Mapping[str, float]  # depth -> mean recall, for every depth evaluated

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["segments"] = list(self.segments)
        out["tried"] = dict(self.tried)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Calibration:
        return cls(
            str(raw["vector"]),
            int(raw["k"]),
            float(raw["target"]),
            float(raw["depth"]),
            float(raw["recall"]),
            float(raw["ci_low"]),
            float(raw["ci_high"]),
            int(raw["queries"]),
            int(raw["real_queries"]),
            bool(raw["met"]),
            int(raw["n_tokens"]),
            tuple(int(s) for s in raw["segments"]),
            float(raw["at"]),
            float(raw["seconds"]),
            float(raw["cpu_s"]),
            {str(d): float(r) for d, r in dict(raw.get("tried", {})).items()},
        )


def choose_depth(
    evaluate: Callable[[float], Sequence[float]], target: float, depths: Sequence[float] = DEPTHS
) -> tuple[float, list[float], bool, dict[float, float]]:
    """The smallest depth of ``depths`` (ascending) whose lower bound (``interval``) on the
    mean of ``evaluate(depth)`` (per-query recalls) reaches ``target``. Recall is taken to grow
    with depth: starting at the depth nearest 1 it steps up one rung at a time until the target
    is met, or down while it still is, so the deep (costly) settings are evaluated only when
    needed; each depth at most once. Returns ``(depth, its recalls, met, {depth: mean recall}
    of every evaluated depth)``; when no depth meets the target, the deepest and ``met``
    False."""
    seen: dict[float, list[float]] = {}

    def ok(i: int) -> bool:
        d = depths[i]
        if d not in seen:
            seen[d] = list(evaluate(d))
        return interval(seen[d])[1] >= target

    i = min(range(len(depths)), key=lambda j: abs(depths[j] - 1.0))
    if ok(i):
        while i > 0 and ok(i - 1):
            i -= 1
        return depths[i], seen[depths[i]], True, _means(seen)
    while i + 1 < len(depths):
        i += 1
        if ok(i):
            return depths[i], seen[depths[i]], True, _means(seen)
    return depths[i], seen[depths[i]], False, _means(seen)


def _means(seen: Mapping[float, Sequence[float]]) -> dict[float, float]:
    return {d: float(np.mean(r)) for d, r in sorted(seen.items())}


class DocSampler:
    """Uniform draws of live objects (with tokens for one vector) from a snapshot of segments:
    ``(tokens, offsets, live rows)`` per segment."""

    def __init__(
        self, parts: Sequence[tuple[Any, npt.NDArray[np.int64], npt.NDArray[np.int64]]]
    ) -> None:
        self._parts = [p for p in parts if len(p[2])]
        self._cum = np.cumsum([len(p[2]) for p in self._parts])

    @property
    def n_docs(self) -> int:
        return int(self._cum[-1]) if len(self._cum) else 0

    def doc(self, rng: np.random.Generator) -> F32:
        i = int(rng.integers(0, self.n_docs))
        part = int(np.searchsorted(self._cum, i, side="right"))
        tokens, offsets, rows = self._parts[part]
        row = int(rows[i - (int(self._cum[part - 1]) if part else 0)])
        return np.asarray(tokens[int(offsets[row]) : int(offsets[row + 1])], dtype=np.float32)


def synthetic_queries(
    sampler: DocSampler,
    n: int,
    rng: np.random.Generator,
    *,
    cosine: bool,
    lengths: Sequence[int] = (),
) -> list[F32]:
    """``n`` queries made from stored objects (see the module docstring). ``lengths``: lengths
    of real queries to draw from (else log-uniform in ``SYNTH_MIN_LEN..SYNTH_MAX_LEN``)."""
    out: list[F32] = []
    if sampler.n_docs == 0:
        return out
    for _ in range(n):
        if lengths:
            m = int(lengths[int(rng.integers(0, len(lengths)))])
        else:
            m = round(math.exp(rng.uniform(math.log(SYNTH_MIN_LEN), math.log(SYNTH_MAX_LEN))))
        m = max(1, m)
        source, other = sampler.doc(rng), sampler.doc(rng)
        from_source = rng.random(m) < rng.uniform(*SYNTH_FROM_SOURCE)
        q = np.empty((m, source.shape[1]), dtype=np.float32)
        q[from_source] = source[rng.integers(0, len(source), int(from_source.sum()))]
        q[~from_source] = other[rng.integers(0, len(other), int((~from_source).sum()))]
        sigma = rng.uniform(*SYNTH_NOISE)
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        g = rng.standard_normal(q.shape, dtype=np.float32)
        q += np.float32(sigma / math.sqrt(q.shape[1])) * norms * g
        if cosine:
            qn = np.linalg.norm(q, axis=1, keepdims=True)
            qn[qn == 0] = 1.0
            q /= qn
        out.append(q)
    return out


class Reservoir:
    """A uniform sample (Algorithm R) of up to ``size`` queries seen by one vector; cheap to
    offer to (a copy is made only for the queries it keeps). Thread-safe."""

    def __init__(self, size: int = RESERVOIR_SIZE, seed: int = 0) -> None:
        self._size = size
        self._items: list[F32] = []
        self._seen = 0
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def offer(self, query: F32) -> None:
        with self._lock:
            self._seen += 1
            if len(self._items) < self._size:
                self._items.append(np.array(query, dtype=np.float32))
                return
            j = int(self._rng.integers(0, self._seen))
            if j < self._size:
                self._items[j] = np.array(query, dtype=np.float32)

    def sample(self, n: int, rng: np.random.Generator) -> list[F32]:
        with self._lock:
            items = list(self._items)
        if len(items) <= n:
            return items
        return [items[i] for i in rng.choice(len(items), n, replace=False)]

    def __len__(self) -> int:
        return len(self._items)

    def lengths(self) -> list[int]:
        with self._lock:
            return [len(q) for q in self._items]


def calibration_due(
    cal: Calibration | None,
    target_k: tuple[float, int],
    segs: tuple[int, ...],
    n_tokens: int,
    *,
    idle: bool,
    since_last_s: float,
    real_queries: int,
    sample_size: int,
) -> str | None:
    """Why a calibrated vector, with indexed segments ``segs`` and ``n_tokens`` live tokens,
    should be (re)calibrated now, or None: never calibrated, its target changed, its tokens
    changed by ``RECALIBRATE_GROWTH``, or the reservoir (``real_queries``) now holds many more
    real queries than the last sample used; once the shard is ``idle`` (an import settled),
    also any change of its indexed segments, or of its tokens by ``RECALIBRATE_IDLE_CHANGE``.
    While writes keep arriving, at most one calibration per ``BUSY_CALIBRATE_S``
    (``since_last_s``: since the last one, or the shard's start)."""
    if not idle and since_last_s < BUSY_CALIBRATE_S:
        return None  # an import is running: calibrate once it settles, or now and then
    target, k = target_k
    if cal is None:
        return "first calibration"
    if (cal.target, cal.k) != (target, k):
        return "target changed"
    if abs(n_tokens - cal.n_tokens) >= RECALIBRATE_GROWTH * max(1, cal.n_tokens):
        return f"tokens {cal.n_tokens} -> {n_tokens}"
    if idle and (
        segs != cal.segments
        or abs(n_tokens - cal.n_tokens) >= RECALIBRATE_IDLE_CHANGE * max(1, cal.n_tokens)
    ):
        return "index changed" if segs != cal.segments else "tokens changed"
    usable = min(real_queries, sample_size)
    if usable > cal.real_queries and usable >= max(
        min(RESERVOIR_MIN, sample_size), 2 * cal.real_queries
    ):
        return f"{usable} real queries to measure with"
    return None
