"""A shard's maintenance policy: when to seal, what to index and when, what to merge.

Pure decisions over the engine's segments and settings (``ShardSettings``); the engine
(``shard.engine``) does the work they decide on: writing segments, building indexes, swapping
merged segments in. See the engine's module docstring for the life of a write and for deferred
indexing.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.settings import ShardSettings
from cluster.spec import CollectionSpec, NamedVectorSpec
from shard.segment import SealedSegment

# Checkpoint (seal, even if small) once the WAL holds this much, e.g. after many deletes.
WAL_CHECKPOINT_BYTES = 64 * 1024 * 1024
# Rewrite a sealed segment whose share of tombstoned objects reaches this.
COMPACT_DEAD_FRACTION = 0.3
# Eager merges (segments below the seal size, or an idle shard): the merged segment holds at
# least this many times the tokens of its largest input (see ``plan_merge``).
EAGER_MERGE_GROWTH = 1.5
# A shard with a vector search in this many seconds indexes its sealed segments at once instead
# of deferring (``ShardSettings.index_defer_tokens``).
DEFER_UNLESS_SEARCHED_S = 30.0
# How much nicer than the shard's writers and searches its background threads run.
MAINTENANCE_NICE = 5


@dataclass(frozen=True)
class MaintenancePolicy:
    spec: CollectionSpec
    settings: ShardSettings

    def seal_due(self, growing_tokens: int, wal_bytes: int, idle: bool) -> bool:
        """The growing segment is sealed at ``seal_threshold_tokens``, when the WAL is large,
        and once the shard is idle when it holds ``brute_force_max_tokens`` (its newest writes
        are then indexed instead of scanned exactly)."""
        st = self.settings
        return (
            growing_tokens >= st.seal_threshold_tokens
            or wal_bytes >= WAL_CHECKPOINT_BYTES
            or (growing_tokens >= max(1, st.brute_force_max_tokens) and idle)
        )

    def needs_index(self, seg: SealedSegment, v: NamedVectorSpec) -> bool:
        return (
            v.index.kind != "flat"
            and v.name not in seg.indexes
            and seg.n_tokens(v.name) >= max(1, self.settings.brute_force_max_tokens)
        )

    def segment_tokens(self, seg: SealedSegment) -> int:
        return sum(seg.live_tokens(v.name) for v in self.spec.vectors)

    def waiting(self, sealed: Sequence[SealedSegment]) -> tuple[list[SealedSegment], int]:
        """The sealed segments that still need an index (oldest first) and their live
        tokens."""
        waiting = [s for s in sealed if any(self.needs_index(s, v) for v in self.spec.vectors)]
        return waiting, sum(map(self.segment_tokens, waiting))

    def defer_tokens(self, last_search_at: float = -math.inf) -> int:
        """``index_defer_tokens``, or 0 when the shard can never become idle or was searched in
        the last ``DEFER_UNLESS_SEARCHED_S`` (its queries would scan the waiting segments
        exactly: query latency comes first)."""
        st = self.settings
        if st.seal_idle_s <= 0 or time.monotonic() - last_search_at < DEFER_UNLESS_SEARCHED_S:
            return 0
        return max(0, st.index_defer_tokens)

    def merge_group(
        self, sealed: Sequence[SealedSegment], idle: bool, defer: int
    ) -> list[SealedSegment]:
        """The sealed segments the next compaction merges (oldest first; [] = none).

        With deferred indexing (``defer`` tokens) and writes still arriving: the segments
        waiting for an index, all together, once they hold ``defer``; otherwise size-tiered
        merges among the others (the waiting ones are scored exactly either way, so merging
        them early buys nothing). Idle or without deferral: ``plan_merge`` over every
        segment."""
        st = self.settings
        candidates = list(sealed)
        if defer and not idle:
            waiting, waiting_tokens = self.waiting(candidates)
            if waiting_tokens >= defer:
                group: list[SealedSegment] = []
                total = 0
                for seg in waiting:
                    total += self.segment_tokens(seg)
                    if group and total > st.max_segment_tokens:
                        break
                    group.append(seg)
                if len(group) >= 2:
                    return group
            waiting_ids = {id(s) for s in waiting}
            candidates = [s for s in candidates if id(s) not in waiting_ids]
        sizes = [self.segment_tokens(s) for s in candidates]
        chosen = set(
            plan_merge(
                sizes,
                st.max_segment_tokens,
                st.merge_factor - 0.5,
                st.seal_threshold_tokens,
                eager=idle,
            )
        )
        return [s for i, s in enumerate(candidates) if i in chosen]

    def compaction(
        self, sealed: Sequence[SealedSegment], idle: bool, defer: int
    ) -> list[SealedSegment]:
        """What the next compaction rewrites: a merge group, else one tombstone-heavy segment
        (``COMPACT_DEAD_FRACTION``); [] = nothing."""
        group = self.merge_group(sealed, idle, defer)
        if len(group) >= 2:
            return group
        return [
            s
            for s in sealed
            if s.n_objects and s.n_live() <= (1 - COMPACT_DEAD_FRACTION) * s.n_objects
        ][:1]

    def index_due(
        self, tokens: int, idle: bool, defer: int, merged_from_indexed: bool = False
    ) -> bool:
        """Whether a segment of ``tokens`` tokens that needs an index gets it now (else it
        waits, see ``index_defer_tokens``). The output of a merge of indexed segments always
        does, so that a compaction never makes a segment exhaustively searched."""
        return not defer or idle or merged_from_indexed or tokens >= defer

    def index_todo(
        self, sealed: Sequence[SealedSegment], idle: bool, defer: int
    ) -> list[tuple[SealedSegment, NamedVectorSpec]]:
        """The (segment, vector) indexes to build now, oldest first. While writes arrive
        (deferral on) the waiting segments are indexed once they add up, and what the next
        compaction merges is indexed once, after the merge."""
        todo = [(s, v) for s in sealed for v in self.spec.vectors if self.needs_index(s, v)]
        if todo and defer:
            waiting = {id(s): s for s, _ in todo}.values()  # what waiting() would list
            if not self.index_due(sum(map(self.segment_tokens, waiting)), idle, defer):
                return []
            merging = {id(s) for s in self.merge_group(sealed, idle, defer)}
            todo = [(s, v) for s, v in todo if id(s) not in merging]
        return todo


def plan_merge(
    sizes: Sequence[int], max_tokens: int, growth: float, small_tokens: int, *, eager: bool = False
) -> list[int]:
    """Which sealed segments to merge (indexes into ``sizes``, live tokens each); [] = none.

    The longest run (≥ 2) of the smallest segments whose merged size stays within
    ``max_tokens`` and reaches ``growth`` × the largest of them -- ≈ ``growth`` similar-sized
    segments (size-tiered). Below ``small_tokens`` (the seal size), or when ``eager`` (an idle
    shard: converge to few big segments), ``EAGER_MERGE_GROWTH`` suffices. Either way a merge
    at least multiplies the size of the segment a token lives in by 1.5, so a token is
    re-written and re-indexed at most log1.5(max_tokens / its first segment's size) times."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    best: list[int] = []
    total = 0
    for m, i in enumerate(order, 1):
        total += sizes[i]
        if total > max_tokens:
            break
        need = (
            EAGER_MERGE_GROWTH
            if eager or sizes[i] < small_tokens
            else max(growth, EAGER_MERGE_GROWTH)
        )
        if m >= 2 and total >= need * sizes[i]:
            best = order[:m]
    return best


def lower_priority() -> None:
    """Below the writers and searches: background work uses the CPU those leave (Linux: per
    thread; the threads a ScaNN build starts inherit it)."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + MAINTENANCE_NICE))
