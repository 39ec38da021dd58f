"""ShardEngine: one shard's data and search, plain Python (the Ray ``ShardActor`` is a thin shell).

Storage is LSM-style under ``data_dir``::

    manifest.json          sealed segments, their tombstone files, the WAL generation to replay
                           from (replaced atomically: write temp, fsync, rename, fsync dir)
    wal/wal-<gen>.log      acknowledged writes not yet in a sealed segment (shard.wal)
    segments/seg-<id>/     immutable Arrow IPC segments + ScaNN indexes, or MUVERA FDEs for
                           ``index.kind == "muvera"`` vectors (shard.segment, shard.muvera)
    bm25/                  tantivy BM25 over the searchable text properties (shard.keyword)

Life of a write::

    upsert ──> WAL append + fsync ──> growing segment (memory, exact search) ──ack
                                          │ maintenance(): tokens >= seal_threshold_tokens
                                          v
           frozen (still searched) ──write+fsync+rename──> sealed (mmap) ──> manifest ──> old
                                                              │                WAL removed
                                     maintenance(): build ScaNN index (>= brute_force_max_tokens)
                                     maintenance(): compact (size-tiered merges, tombstone-heavy)

Idle (no write for ``seal_idle_s``): the growing segment is sealed and indexed even below
seal_threshold_tokens once it holds brute_force_max_tokens, and merges become eager, so a shard
converges to a few big indexed segments after an import settles (``plan_merge``). When to seal,
index and merge is decided by ``shard.maintenance.MaintenancePolicy``; this module does the work.

Deferred indexing (``index_defer_tokens``): while writes keep arriving and nobody searches the
shard, sealed segments wait unindexed (scored exactly) until together they hold that many tokens,
then are merged into one segment that is indexed once; an idle shard merges what waits and
indexes it. A vector search turns deferral off for ``DEFER_UNLESS_SEARCHED_S``. Without it a bulk
import indexed every token at each merge tier (the 635k-token benchmark shard: ~3.7 ScaNN builds
of its tokens instead of one).

Locks (always taken in this order): ``_maint_lock`` serialises maintenance units (seal, index
build, compaction, manifest writes); ``_write_lock`` serialises writers so WAL order is apply
order (the fsync happens here, outside the state lock); ``_state_lock`` guards the in-memory
state and is held only for short swaps and snapshots. Heavy work (segment files, ScaNN builds,
compaction) runs outside ``_write_lock`` and ``_state_lock``; searches take a snapshot of segment
views under ``_state_lock`` and score outside it, so queries and writes never wait for a build.

Search (shard.search): a snapshot of every segment's view; the indexed segments are probed as
one token index (a shard-wide k' threshold), the others scored exactly; exact MaxSim
(shard.maxsim) on the candidates; per-segment top k merged here (score desc, uuid asc). A
``muvera`` vector's sealed segments carry per-document FDEs instead of a token index: the
shard-wide top ``candidates`` eligible documents by FDE score become the allow-lists of those
segments (shard.search.fde_allow_lists), which search_segments then scores exactly.

Recovery (the files: ``shard.manifest``): load the manifest's segments and tombstones, then
replay every WAL generation from the manifest's one. Replay is last-writer-wins per uuid, so it
is correct even when the persisted tombstones already reflect some of the replayed operations.

Storage failures (disk full, I/O errors): a write whose WAL append fails changes nothing (the WAL
cuts the partial record away, see shard.wal) and raises ``InsufficientStorage`` /
``StorageError``; the next write can succeed once space is back. A failed seal, index build or
compaction removes its temporary files, keeps the frozen segment served and its WAL generation,
and is retried by the background loop (with backoff); a failed checkpoint is retried first.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cluster.errors import InvalidInput, NotFound, Unavailable
from cluster.objectstore import ObjectStore, S3Url
from cluster.recall import interval, recall_at, target_of
from cluster.settings import ShardSettings
from cluster.spec import CollectionSpec, NamedVectorSpec
from cluster.types import (
    F32,
    Hit,
    KeywordSearch,
    ObjectBatch,
    ShardSearchResult,
    ShardStats,
    StoredObject,
    VectorSearch,
    WriteResult,
)
from shard.background import BackgroundPool
from shard.calibrate import (
    Calibration,
    DocSampler,
    Reservoir,
    calibration_due,
    choose_depth,
    synthetic_queries,
)
from shard.codec import dir_size_bytes, fsync_dir, fsync_tree, lock_dir, remove_path
from shard.index import ScannTokenIndex
from shard.keyword import KeywordIndex, searchable_fields
from shard.maintenance import MaintenancePolicy, lower_priority
from shard.manifest import (
    CALIBRATION_FILE,
    MANIFEST,
    Manifest,
    SegmentEntry,
    clean_segment_dir,
    load_index,
    read_calibrations,
    read_tombstones,
    remove_unreferenced,
    segment_dir,
    tombstone_file,
    write_calibrations,
    write_tombstones,
)
from shard.maxsim import maxsim_explain, widen
from shard.muvera import MuveraIndex, candidates_option
from shard.search import (
    NO_DEADLINE,
    Deadline,
    fde_allow_lists,
    scaled_candidates,
    search_segments,
)
from shard.segment import (
    Bools,
    GrowingSegment,
    SealedSegment,
    Segment,
    SegmentView,
    all_float32,
    gather_live,
    write_segment,
)
from shard.tokencodec import CodedTokens
from shard.wal import WriteAheadLog, storage_error

logger = logging.getLogger(__name__)

# Index options that fix a vector's search depth by hand (no calibration).
FIXED_DEPTH_OPTIONS = (
    "candidates_per_token",
    "rerank_docs",
    "candidates",
    "leaves_to_search",
    "leaves_to_search_fraction",
)
# Real queries start counting for a calibration's sample once the reservoir holds this many.
REAL_LENGTHS_MIN = 16
BACKGROUND_INTERVAL_S = 0.5
# A shard written, searched or maintained within this window keeps polling its background work
# every BACKGROUND_INTERVAL_S; one quiet for longer is idle (shard.background backs off).
ACTIVE_WINDOW_S = 120.0
# A backup's staging directory inside the data dir (left over by a crash: removed at open).
BACKUP_STAGING_PREFIX = "backup-staging-"
# How often the calibration thread checks whether a calibration is due.
CALIBRATION_INTERVAL_S = 2.0


class ShardEngine:
    def __init__(
        self, spec: CollectionSpec, shard: int, data_dir: Path, settings: ShardSettings
    ) -> None:
        self.spec = spec
        self.shard = shard
        self.data_dir = Path(data_dir)
        self.settings = settings
        self._maint_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake: threading.Event | _PoolWaker = threading.Event()
        self._pools: BackgroundPools | None = None
        self._maintenance_backoff = _Backoff(BACKGROUND_INTERVAL_S, 30.0)
        self._calibration_backoff = _Backoff(CALIBRATION_INTERVAL_S, 300.0)
        self._worked_at = -math.inf  # the last maintenance() that did some work
        self._written_at = -math.inf  # the last write applied (recovery's replay included)
        self._thread: threading.Thread | None = None
        self._calibrator: threading.Thread | None = None
        self._closed = False
        self._growing = GrowingSegment(spec, settings.seal_threshold_tokens)
        self._growing_gen = 0  # oldest WAL generation holding the growing segment's writes
        self._frozen: list[tuple[GrowingSegment, int]] = []  # (segment, its WAL generation)
        self._sealed: list[SealedSegment] = []
        self._loc: dict[str, tuple[Segment, int]] = {}
        self._sorted_uuids: list[str] | None = None
        self._manifest_seq = 0
        self._next_segment_id = 0
        self._persisted_masks: dict[int, tuple[Any, str | None]] = {}
        self._checkpoint_due = False
        self._last_write_at = time.monotonic()  # idle detection (ShardSettings.seal_idle_s)
        self._last_search_at = -math.inf  # deferred indexing only while nobody searches
        self._segments_dir = self.data_dir / "segments"
        self._wal = WriteAheadLog(self.data_dir / "wal", fsync=settings.fsync)
        self._keyword: KeywordIndex | None = None
        self._policy = MaintenancePolicy(spec, settings)  # when to seal, index, merge
        # Recall calibration (shard.calibrate): per vector, the measured depth and a sample of
        # the real queries it has served.
        self._calibrations: dict[str, Calibration] = {}
        self._reservoirs = {v.name: Reservoir(seed=shard) for v in spec.vectors}
        self._calibrated_at = time.monotonic()  # while writes arrive: one per BUSY_CALIBRATE_S
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = lock_dir(self.data_dir, f"{spec.name}:{shard}")
        try:
            self._recover()
        except BaseException:
            self._lock_file.close()
            raise

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        self._segments_dir.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self.data_dir):  # a backup interrupted by a crash
            if name.startswith(BACKUP_STAGING_PREFIX):
                shutil.rmtree(self.data_dir / name, ignore_errors=True)
        manifest = Manifest.read(self.data_dir)
        self._manifest_seq = manifest.seq
        self._next_segment_id = manifest.next_segment_id
        wal_gen = manifest.wal_generation
        for entry in manifest.segments:
            self._sealed.append(self._open_segment(entry.id, entry.deleted))
        remove_unreferenced(self._segments_dir, (s.directory.name for s in self._sealed))
        for seg in self._sealed:
            for row in np.flatnonzero(~seg.deleted).tolist():
                self._place(seg.uuids[row], seg, row)
        n_sealed = len(self._loc)
        fields = searchable_fields(self.spec)
        if fields:
            kw = self._keyword = KeywordIndex(self.data_dir / "bm25", fields, manifest.bm25_fields)
            if kw.rebuilt:
                for seg in self._sealed:
                    kw.upsert(
                        (seg.uuids[r], seg.properties(r))
                        for r in np.flatnonzero(~seg.deleted).tolist()
                    )
        n_replayed = 0
        for record in self._wal.replay(wal_gen):
            n_replayed += 1
            if record.op == "upsert":
                assert record.batch is not None
                self._apply_upsert(record.batch)
                self._keyword_upsert(record.batch)
            else:
                self._apply_delete(record.uuids)
                if self._keyword is not None:
                    self._keyword.delete(record.uuids)
        if self._keyword is not None:
            self._keyword.commit()
        self._wal.remove_before(wal_gen)
        self._wal.open(wal_gen)
        self._growing_gen = wal_gen
        self._load_calibrations()
        logger.info(
            "shard %s:%d opened: %d segments (%d objects), %d WAL records replayed",
            self.spec.name,
            self.shard,
            len(self._sealed),
            n_sealed,
            n_replayed,
        )

    def _open_segment(self, segment_id: int, deleted_file: str | None) -> SealedSegment:
        seg = SealedSegment(segment_id, self._segment_dir(segment_id), self.spec)
        if deleted_file:
            seg.deleted = read_tombstones(seg.directory, deleted_file, seg.n_objects)
        self._persisted_masks[segment_id] = (seg.deleted, deleted_file)
        clean_segment_dir(seg.directory, deleted_file)
        for v in self.spec.vectors:
            index_dir = seg.index_dir(v.name)
            if index_dir.is_dir():
                try:
                    seg.indexes[v.name] = load_index(index_dir, v, seg.n_objects)
                except Exception:  # a bad index is rebuilt, never fatal
                    logger.warning(
                        "segment %s: cannot load index for %r; rebuilding",
                        seg.directory,
                        v.name,
                        exc_info=True,
                    )
                    shutil.rmtree(index_dir, ignore_errors=True)
        return seg

    def _segment_dir(self, segment_id: int) -> Path:
        return segment_dir(self._segments_dir, segment_id)

    # ------------------------------------------------------------------ in-memory state
    # The _apply_* / _place helpers run under _state_lock (or single-threaded in recovery).

    def _place(self, uuid: str, segment: Segment, row: int) -> tuple[Segment, int] | None:
        old = self._loc.get(uuid)
        self._loc[uuid] = (segment, row)
        if old is None:
            self._sorted_uuids = None
        return old

    def _apply_upsert(self, batch: ObjectBatch) -> None:
        self._last_write_at = self._written_at = time.monotonic()
        base = self._growing.append(batch)
        kills: dict[Segment, list[int]] = {}
        for i, uuid in enumerate(batch.uuids):
            old = self._place(uuid, self._growing, base + i)
            if old is not None:
                kills.setdefault(old[0], []).append(old[1])
        for seg, rows in kills.items():
            seg.mark_deleted(rows)

    def _apply_delete(self, uuids: Sequence[str]) -> list[bool]:
        self._last_write_at = self._written_at = time.monotonic()
        kills: dict[Segment, list[int]] = {}
        existed = []
        for uuid in uuids:
            old = self._loc.pop(uuid, None)
            existed.append(old is not None)
            if old is not None:
                kills.setdefault(old[0], []).append(old[1])
        if kills:
            self._sorted_uuids = None
        for seg, rows in kills.items():
            seg.mark_deleted(rows)
        return existed

    def _keyword_upsert(self, batch: ObjectBatch) -> None:
        if self._keyword is not None:
            self._keyword.upsert(zip(batch.uuids, batch.properties, strict=True))

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(
                f"shard {self.spec.name}:{self.shard} is closed",
                {"collection": self.spec.name, "shard": self.shard},
            )

    # ------------------------------------------------------------------ writes

    def upsert(self, batch: ObjectBatch) -> list[WriteResult]:
        if len(batch) == 0:
            return []
        with self._write_lock:
            self._check_open()
            try:
                self._wal.append_upsert(batch)
            except OSError as exc:  # nothing of this batch was kept; nothing else changed
                raise self._storage_error(exc) from exc
            with self._state_lock:
                self._apply_upsert(batch)
                seal_due = self._growing.n_tokens() >= self.settings.seal_threshold_tokens
            self._keyword_upsert(batch)
        if seal_due:
            self._wake.set()
        return [WriteResult(uuid, True) for uuid in batch.uuids]

    def delete(self, uuids: Sequence[str]) -> list[bool]:
        with self._write_lock:
            self._check_open()
            present = [u for u in dict.fromkeys(uuids) if u in self._loc]
            if present:  # only writers change the key set, and we are the writer
                try:
                    self._wal.append_delete(present)
                except OSError as exc:
                    raise self._storage_error(exc) from exc
            with self._state_lock:
                existed = self._apply_delete(uuids)
            if self._keyword is not None:
                self._keyword.delete(present)
            return existed

    def _storage_error(self, exc: OSError) -> Exception:
        logger.error("shard %s:%d: write failed: %s", self.spec.name, self.shard, exc)
        return storage_error(
            exc,
            f"shard {self.spec.name}:{self.shard}",
            {"collection": self.spec.name, "shard": self.shard},
        )

    # ------------------------------------------------------------------ reads

    def get(self, uuid: str, include_vectors: bool = False) -> StoredObject | None:
        self._check_open()
        with self._state_lock:
            loc = self._loc.get(uuid)
        if loc is None:
            return None
        return self._stored(uuid, loc[0], loc[1], include_vectors)

    def _stored(self, uuid: str, seg: Segment, row: int, include_vectors: bool) -> StoredObject:
        if not include_vectors:
            return StoredObject(uuid, dict(seg.properties(row)))
        vectors = _present_vectors(seg.vectors_of(row))
        lossy = tuple(n for n in seg.lossy_vectors() if n in vectors)
        return StoredObject(uuid, dict(seg.properties(row)), vectors, lossy)

    def list_objects(
        self, after: str | None, limit: int, include_vectors: bool = False
    ) -> list[StoredObject]:
        self._check_open()
        with self._state_lock:
            if self._sorted_uuids is None:
                self._sorted_uuids = sorted(self._loc)
            keys = self._sorted_uuids
            start = 0 if after is None else bisect.bisect_right(keys, after)
            page = [(u, self._loc[u]) for u in keys[start : start + max(0, limit)]]
        return [self._stored(u, seg, row, include_vectors) for u, (seg, row) in page]

    def count(self) -> int:
        return len(self._loc)

    def search(self, req: VectorSearch) -> ShardSearchResult:
        self._check_open()
        deadline = Deadline.after(req.budget_s)
        self._last_search_at = time.monotonic()
        vspec = self.spec.vector(req.target_vector)
        query = np.ascontiguousarray(req.query, dtype=np.float32)
        assert query.ndim == 2 and query.shape[1] == vspec.dim, "query shape"
        if query.shape[0] == 0:
            return ShardSearchResult(self.shard, (), 0, len(self._loc))
        with self._state_lock:
            views = self._views()
            n_live = len(self._loc)
        exact = req.exact or vspec.index.kind == "flat"  # for this query / this vector
        found, n_candidates = self._ranked(
            views, n_live, vspec, query, req.k, req.filter, exact, self._depth(vspec), deadline
        )
        if not exact and not req.probe:  # a sample of the real workload (shard.calibrate)
            self._reservoirs[vspec.name].offer(query)
        hits_out = tuple(self._hit(req, vspec, query, *f) for f in found)
        return ShardSearchResult(self.shard, hits_out, n_candidates, n_live)

    def _ranked(
        self,
        views: list[SegmentView],
        n_live: int,
        vspec: NamedVectorSpec,
        query: F32,
        k: int,
        flt: Any,
        exact: bool,
        depth: float,
        deadline: Deadline = NO_DEADLINE,
        on_codes: bool = False,
    ) -> tuple[list[tuple[float, str, Segment, int]], int]:
        """The top ``k`` of a snapshot (score desc, uuid asc) as ``(score, uuid, segment,
        row)``, and how many objects were scored exactly. ``exact``: no token index / FDE, and
        a lossy codec's kept originals scored instead of its codes — unless ``on_codes``
        (calibration: every code scored, then the final re-rank on the originals as a search
        does, so its truth never reads the whole cold file); ``depth``: the factor on the
        candidate budget (``_search_params``)."""
        if exact:
            views = [_without_index(v, originals=not on_codes) for v in views]
        n_tokens = sum(
            int(vv.offsets[-1]) for v in views if (vv := v.vectors.get(vspec.name)) is not None
        )
        k_prime, rerank, leaves, fde_candidates = self._search_params(
            vspec, n_tokens, n_live, depth
        )
        allowed: list[Bools | None] = [
            None if flt is None else _allow_list(v.segment, v.n_objects, v.deleted, flt)
            for v in views
        ]
        if vspec.index.kind == "muvera" and not exact:  # FDE candidates, re-scored below
            allowed = fde_allow_lists(views, vspec.name, query, k, allowed, fde_candidates)
        found: list[tuple[float, str, Segment, int]] = []
        n_candidates = 0
        for hits in search_segments(
            views,
            vspec.name,
            query,
            k,
            allowed=allowed,
            k_prime=k_prime,
            rerank_docs=max(rerank, 4 * k) if rerank > 0 else 0,
            final_rerank=max(self.settings.final_rerank_docs, 4 * k)
            if self.settings.final_rerank_docs > 0
            else 0,
            deadline=deadline,
            leaves_factor=leaves,
        ):
            n_candidates += hits.n_candidates
            seg = hits.view.segment
            found.extend(
                (float(s), seg.uuids[r], seg, r)
                for r, s in zip(hits.rows.tolist(), hits.scores.tolist(), strict=True)
            )
        found.sort(key=lambda t: (-t[0], t[1]))
        return found[: max(0, k)], n_candidates

    def _search_params(
        self, vspec: NamedVectorSpec, n_tokens: int, n_objects: int, depth: float
    ) -> tuple[int, int, float, int]:
        """``(k', rerank_docs, leaves factor, FDE candidates)`` for a search of ``vspec`` over
        ``n_tokens`` tokens / ``n_objects`` objects at calibrated ``depth``: the configured
        values (index options, else the shard settings), scaled with the shard's size
        (``scaled_candidates``), × ``depth`` (the leaves searched × √depth)."""
        opts = vspec.index.options
        k_prime = int(opts.get("candidates_per_token", self.settings.candidates_per_token))
        rerank = int(opts.get("rerank_docs", self.settings.rerank_docs))
        k_prime, rerank = scaled_candidates(
            k_prime,
            rerank,
            n_tokens,
            n_objects,
            float(opts.get("candidates_scale_exponent", self.settings.candidates_scale_exponent)),
        )
        fde = candidates_option(opts)
        if depth != 1.0:
            k_prime = max(1, math.ceil(k_prime * depth))
            rerank = math.ceil(rerank * depth) if rerank > 0 else 0
            fde = max(1, math.ceil(fde * depth))
        return k_prime, rerank, math.sqrt(depth), fde

    # ------------------------------------------------------------------ recall calibration

    def _calibrates(self, vspec: NamedVectorSpec) -> bool:
        """Whether ``vspec``'s search depth is calibrated (an approximate index, no option
        fixing the depth by hand, calibration on)."""
        return (
            self.settings.calibration_queries > 0
            and vspec.index.kind in ("scann", "muvera")
            and not any(o in vspec.index.options for o in FIXED_DEPTH_OPTIONS)
        )

    def _depth(self, vspec: NamedVectorSpec) -> float:
        cal = self._calibrations.get(vspec.name)
        if cal is None or not self._calibrates(vspec):
            return 1.0
        return cal.depth

    def _segments(self) -> list[Segment]:
        """Every segment: sealed, frozen, growing. Caller holds ``_state_lock``."""
        return [*self._sealed, *(f for f, _ in self._frozen), self._growing]

    def _views(self) -> list[SegmentView]:
        """A snapshot of every segment. Caller holds ``_state_lock``."""
        return [s.view() for s in self._segments()]

    def _indexed(self, vspec: NamedVectorSpec) -> tuple[tuple[int, ...], int]:
        """The sealed segments with an index for ``vspec`` and the vector's live tokens.
        Caller holds ``_state_lock``."""
        segs = tuple(sorted(s.segment_id for s in self._sealed if vspec.name in s.indexes))
        return segs, sum(s.live_tokens(vspec.name) for s in self._segments())

    def calibration_due(self, vspec: NamedVectorSpec) -> str | None:
        """Why ``vspec`` should be (re)calibrated now, or None (``_due``)."""
        with self._state_lock:
            segs, n_tokens = self._indexed(vspec)
        return self._due(vspec, segs, n_tokens)

    def _due(self, vspec: NamedVectorSpec, segs: tuple[int, ...], n_tokens: int) -> str | None:
        """Why ``vspec``, with indexed segments ``segs`` and ``n_tokens`` live tokens, should
        be (re)calibrated now, or None (``shard.calibrate.calibration_due``)."""
        if not self._calibrates(vspec) or not segs:
            return None  # not calibrated, or searched exactly: nothing to calibrate
        return calibration_due(
            self._calibrations.get(vspec.name),
            target_of(vspec.index.options),
            segs,
            n_tokens,
            idle=self.idle(),
            since_last_s=time.monotonic() - self._calibrated_at,
            real_queries=len(self._reservoirs[vspec.name]),
            sample_size=self.settings.calibration_queries,
        )

    def recalibrate(self) -> bool:
        """Run the first calibration that is due (``calibration_due``); False if none was (or
        the shard closed meanwhile). The calibration thread calls this; so can tests."""
        if self._closed:
            return False
        for v in self.spec.vectors:
            reason = self.calibration_due(v)
            if reason is not None:
                return self.calibrate(v.name, reason) is not None
        return False

    def sample_queries(self, vector: str, n: int, seed: int) -> list[F32]:
        """``n`` queries for measuring ``vector``'s recall: real ones from the reservoir (as
        many as it holds), the rest made from stored objects (shard.calibrate)."""
        vspec = self.spec.vector(vector)
        with self._state_lock:
            views = self._views()
        return self._sample(views, vspec, n, np.random.default_rng(seed))[0]

    def _sample(
        self, views: list[SegmentView], vspec: NamedVectorSpec, n: int, rng: np.random.Generator
    ) -> tuple[list[F32], int]:
        """``(queries, how many of them are real)``."""
        reservoir = self._reservoirs[vspec.name]
        real = reservoir.sample(n, rng)
        lengths = reservoir.lengths()
        parts = []
        for view in views:
            vv = view.vectors.get(vspec.name)
            if vv is not None and view.n_objects:
                live = np.flatnonzero(~view.deleted & (np.diff(vv.offsets) > 0))
                parts.append((vv.tokens, vv.offsets, live.astype(np.int64)))
        return real + synthetic_queries(
            DocSampler(parts),
            n - len(real),
            rng,
            cosine=vspec.metric == "cosine",
            lengths=lengths if len(lengths) >= REAL_LENGTHS_MIN else (),
        ), len(real)

    def forget_queries(self) -> None:
        """Empty the reservoirs of real queries (a workload changed; a benchmark's measured
        queries must not calibrate the shard)."""
        self._reservoirs = {v.name: Reservoir(seed=self.shard) for v in self.spec.vectors}

    def calibrate(self, vector: str, reason: str = "asked") -> Calibration | None:
        """Measure ``vector``'s recall@k on a sample (``sample_queries``) against exact MaxSim
        and keep the cheapest depth that meets its target (shard.calibrate); persisted and
        shown in stats. Runs at most ``calibration_duty`` of one core (it sleeps between
        queries); None if the shard closed meanwhile or has nothing to search."""
        vspec = self.spec.vector(vector)
        target, k = target_of(vspec.index.options)
        started, cpu0, wall0 = time.time(), time.thread_time(), time.monotonic()
        with self._state_lock:
            views = self._views()
            n_live = len(self._loc)
            segs, n_tokens = self._indexed(vspec)
        rng = np.random.default_rng([self.shard, int(started * 1000)])
        queries, n_real = self._sample(views, vspec, self.settings.calibration_queries, rng)
        if not queries:
            return None
        duty = min(1.0, max(0.05, self.settings.calibration_duty))

        def ranked(q: F32, exact: bool, depth: float) -> list[float]:
            t0 = time.monotonic()
            found, _ = self._ranked(views, n_live, vspec, q, k, None, exact, depth, on_codes=True)
            if self._stop.wait((time.monotonic() - t0) * (1 / duty - 1)):
                raise _Stopped
            return [f[0] for f in found]

        try:
            truth = [ranked(q, True, 1.0) for q in queries]
            depth, recalls, met, tried = choose_depth(
                lambda d: [
                    recall_at(ranked(q, False, d), t, k)
                    for q, t in zip(queries, truth, strict=True)
                ],
                target,
            )
        except _Stopped:
            return None
        mean, low, high = interval(recalls)
        cal = Calibration(
            vspec.name,
            k,
            target,
            depth,
            round(mean, 4),
            round(low, 4),
            round(high, 4),
            len(queries),
            n_real,
            met,
            n_tokens,
            segs,
            round(started, 3),
            round(time.monotonic() - wall0, 3),
            round(time.thread_time() - cpu0, 3),
            {f"{d:g}": round(r, 4) for d, r in tried.items()},
        )
        with self._state_lock:
            self._calibrations[vspec.name] = cal
            self._calibrated_at = time.monotonic()
        self._persist_calibrations()
        logger.info(
            "shard %s:%d: calibrated %r (%s): depth %g, recall@%d %.3f (≥ %.3f at 95 %%, "
            "target %.3f%s), %d queries, %.1f s",
            self.spec.name,
            self.shard,
            vector,
            reason,
            depth,
            k,
            mean,
            low,
            target,
            "" if met else ", NOT met",
            len(queries),
            cal.seconds,
        )
        return cal

    def _persist_calibrations(self) -> None:
        with self._state_lock:
            calibrations = dict(self._calibrations)
        write_calibrations(self.data_dir, calibrations, fsync=self.settings.fsync)

    def _load_calibrations(self) -> None:
        try:
            self._calibrations = read_calibrations(
                self.data_dir, (v.name for v in self.spec.vectors)
            )
        except (ValueError, KeyError, TypeError, AttributeError):  # recalibrated, never fatal
            logger.warning(
                "shard %s:%d: unreadable %s; recalibrating",
                self.spec.name,
                self.shard,
                self.data_dir / CALIBRATION_FILE,
                exc_info=True,
            )
            self._calibrations = {}

    def calibration_report(self) -> dict[str, dict[str, Any]]:
        """Per vector: its calibration state and figures, and the search parameters in use."""
        with self._state_lock:
            n_live = len(self._loc)
            indexed = {v.name: self._indexed(v) for v in self.spec.vectors}
        out: dict[str, dict[str, Any]] = {}
        for v in self.spec.vectors:
            segs, n_tokens = indexed[v.name]
            cal = self._calibrations.get(v.name)
            target, k = target_of(v.index.options)
            if v.index.kind == "flat" or not segs:
                state = "exact"  # every object is scored exactly: recall 1
            elif self.settings.calibration_queries <= 0:
                state = "disabled"
            elif not self._calibrates(v):
                state = "fixed"  # index options set the depth by hand
            else:
                state = "calibrated" if cal is not None else "pending"
            depth = self._depth(v)
            k_prime, rerank, leaves, fde = self._search_params(v, n_tokens, n_live, depth)
            entry: dict[str, Any] = {
                "state": state,
                "target": target,
                "k": k,
                "depth": depth,
                "due": self._due(v, segs, n_tokens),
            }
            if v.index.kind == "scann":
                entry.update(k_prime=k_prime, rerank_docs=rerank, leaves_factor=round(leaves, 4))
            elif v.index.kind == "muvera":
                entry.update(fde_candidates=fde)
            if cal is not None:
                entry["measured"] = cal.to_dict()
            out[v.name] = entry
        return out

    def keyword_search(self, req: KeywordSearch) -> ShardSearchResult:
        """BM25 top ``req.k`` over the searchable text properties (ties: uuid asc)."""
        self._check_open()
        n_live = len(self._loc)
        if self._keyword is None:
            return ShardSearchResult(self.shard, (), 0, n_live)
        flt = req.filter

        def allow(uuid: str) -> bool:
            loc = self._loc.get(uuid)  # BM25 may briefly know an object the engine dropped
            return loc is not None and (flt is None or bool(flt.matches(loc[0].properties(loc[1]))))

        ranked = self._keyword.search(req.query, req.k, req.properties, allow)
        hits = []
        for uuid, score in ranked:
            loc = self._loc.get(uuid)
            if loc is None:  # deleted meanwhile
                continue
            seg, row = loc
            props = seg.properties(row)
            if req.return_properties is not None:
                props = {k: props[k] for k in req.return_properties if k in props}
            vectors = _present_vectors(seg.vectors_of(row)) if req.include_vectors else None
            hits.append(Hit(uuid, score, dict(props), vectors))
        return ShardSearchResult(self.shard, tuple(hits), len(ranked), n_live)

    def _hit(
        self,
        req: VectorSearch,
        vspec: NamedVectorSpec,
        query: F32,
        score: float,
        uuid: str,
        seg: Segment,
        row: int,
    ) -> Hit:
        props = seg.properties(row)
        if req.return_properties is not None:
            props = {k: props[k] for k in req.return_properties if k in props}
        vectors = seg.vectors_of(row) if (req.include_vectors or req.explain) else {}
        explain = None
        if req.explain:
            explain = {"tokens": maxsim_explain(query, vectors[vspec.name])}
        return Hit(
            uuid,
            score,
            dict(props),
            _present_vectors(vectors) if req.include_vectors else None,
            explain,
        )

    def stats(self) -> ShardStats:
        idle = self.idle()
        with self._state_lock:
            sealed = list(self._sealed)
            others: list[Segment] = [f for f, _ in self._frozen]
            if self._growing.n_objects:
                others.append(self._growing)
            n_objects = len(self._loc)
            # waiting: held back by deferred indexing (writes still arriving, too few tokens)
            held = not self._policy.index_due(
                self._policy.waiting(self._sealed)[1], idle, self._defer_tokens()
            )
        n_tokens = {
            v.name: sum(s.live_tokens(v.name) for s in [*sealed, *others])
            for v in self.spec.vectors
        }
        index_state = {}
        for v in self.spec.vectors:
            n_index = sum(1 for s in sealed if v.name in s.indexes)
            pending = [s for s in sealed if self._policy.needs_index(s, v)]
            n_waiting = len(pending) if held else 0
            n_exact = len(sealed) - n_index - len(pending)
            index_state[v.name] = (
                f"{v.index.kind}: "
                f"indexed={n_index} building={len(pending) - n_waiting} "
                f"exact={n_exact} growing={len(others)} waiting={n_waiting}"
            )
        return ShardStats(
            self.shard,
            n_objects,
            n_tokens,
            len(sealed) + len(others),
            index_state,
            dir_size_bytes(self.data_dir),
            calibration=self.calibration_report(),
        )

    def index_bytes(self) -> int:
        """Bytes of the token indexes and FDEs (their serialized size; ScaNN loads the same
        arrays, the FDEs are memory-mapped)."""
        with self._state_lock:
            dirs = [s.index_dir(name) for s in self._sealed for name in s.indexes]
        return sum(dir_size_bytes(d) for d in dirs)

    # ------------------------------------------------------------------ maintenance

    def idle(self) -> bool:
        """No write for ``seal_idle_s`` (never when it is 0)."""
        idle_s = self.settings.seal_idle_s
        return idle_s > 0 and time.monotonic() - self._last_write_at >= idle_s

    def maintenance(self) -> bool:
        """One unit of background work: seal, else build one index, else compact once."""
        with self._maint_lock:
            if self._closed:
                return False
            if self._checkpoint_due:  # a checkpoint failed earlier (e.g. disk full): retry
                self._checkpoint()
                did = True
            else:
                did = self._maybe_seal() or self._maybe_build_index() or self._maybe_compact()
            if did:
                self._worked_at = time.monotonic()
            return did

    def _maybe_seal(self) -> bool:
        with self._write_lock, self._state_lock:
            if not self._frozen:  # else: retry a seal that failed earlier
                g = self._growing
                due = self._policy.seal_due(g.n_tokens(), self._wal.size_bytes(), self.idle())
                if not due or (g.n_objects == 0 and self._wal.size_bytes() == 0):
                    return False
                new_gen = self._wal.rotate()  # first: if it fails, nothing has changed
                if g.n_objects:
                    g.frozen = True
                    self._frozen.append((g, self._growing_gen))
                    self._growing = GrowingSegment(self.spec, self.settings.seal_threshold_tokens)
                self._growing_gen = new_gen
            pending = [f for f, _ in self._frozen]
        for frozen in pending:
            self._seal(frozen)
        self._checkpoint()
        return True

    def _seal(self, frozen: GrowingSegment) -> None:
        with self._state_lock:
            segment_id = self._new_segment_id()
        final = self._segment_dir(segment_id)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            frozen.write(tmp, fsync=self.settings.fsync, references=self._code_references())
            os.rename(tmp, final)
        except BaseException:  # e.g. disk full: free the space; the frozen segment stays
            shutil.rmtree(tmp, ignore_errors=True)  # served and in the WAL, and is retried
            raise
        if self.settings.fsync:
            fsync_dir(self._segments_dir)
        sealed = SealedSegment(segment_id, final, self.spec)
        with self._state_lock:
            assert len(frozen.deleted) == sealed.n_objects
            sealed.deleted = frozen.deleted
            for uuid in frozen.uuids:
                cur = self._loc.get(uuid)
                if cur is not None and cur[0] is frozen:
                    self._loc[uuid] = (sealed, cur[1])
            self._sealed.append(sealed)
            self._frozen = [(f, gen) for f, gen in self._frozen if f is not frozen]

    def _code_references(self) -> dict[str, CodedTokens]:
        """Per lossy-coded vector, the newest sealed segment's codes: a new segment reuses
        their residual buckets, so merges copy codes instead of re-quantising."""
        with self._state_lock:
            sealed = list(self._sealed)
        out: dict[str, CodedTokens] = {}
        for v in self.spec.vectors:
            for seg in reversed(sealed):
                coded = seg.coded(v.name) if v.codec.lossy else None
                if coded is not None and len(coded):
                    out[v.name] = coded
                    break
        return out

    def _new_segment_id(self) -> int:
        segment_id = self._next_segment_id
        self._next_segment_id += 1
        return segment_id

    def _checkpoint(self) -> None:
        """Persist tombstones + the manifest, then drop WAL generations it covers."""
        self._checkpoint_due = True  # until this one succeeds
        with self._state_lock:
            sealed = [(s, s.deleted) for s in self._sealed]
            wal_gen = min([gen for _, gen in self._frozen] + [self._growing_gen])
            self._manifest_seq += 1
            seq = self._manifest_seq
            next_id = self._next_segment_id
        entries = []
        persisted: dict[int, tuple[Any, str | None]] = {}
        for seg, mask in sealed:
            prev = self._persisted_masks.get(seg.segment_id)
            if prev is not None and prev[0] is mask:
                name = prev[1]
            elif mask.any():
                name = tombstone_file(seq)
                write_tombstones(seg.directory, name, mask, fsync=self.settings.fsync)
            else:
                name = None
            persisted[seg.segment_id] = (mask, name)
            entries.append(SegmentEntry(seg.segment_id, seg.n_objects, name))
        bm25_fields = None
        if self._keyword is not None:
            self._keyword.commit()  # BM25 covers everything before wal_gen (see shard.keyword)
            bm25_fields = self._keyword.fields
        Manifest(
            seq,
            next_id,
            wal_gen,
            tuple(entries),
            bm25_fields,
            {"spec": self.spec.to_dict(), "shard": self.shard},
        ).write(self.data_dir, fsync=self.settings.fsync)
        for seg, _ in sealed:  # old tombstone files are garbage now
            prev = self._persisted_masks.get(seg.segment_id)
            if prev is not None and prev[1] and prev[1] != persisted[seg.segment_id][1]:
                remove_path(seg.directory / prev[1])
        self._persisted_masks = persisted
        self._checkpoint_due = False
        with self._write_lock:
            self._wal.remove_before(wal_gen)

    def _defer_tokens(self) -> int:
        return self._policy.defer_tokens(self._last_search_at)

    def _maybe_build_index(self) -> bool:
        idle = self.idle()
        with self._state_lock:
            todo = self._policy.index_todo(self._sealed, idle, self._defer_tokens())
        if not todo:
            return False
        seg, v = todo[0]
        index = self._build_index(seg, v)
        with self._state_lock:
            seg.indexes[v.name] = index
        return True

    def _build_index(self, seg: SealedSegment, v: NamedVectorSpec) -> ScannTokenIndex | MuveraIndex:
        index: ScannTokenIndex | MuveraIndex
        if v.index.kind == "muvera":
            index = MuveraIndex.build(
                _index_rows(seg, v.name), seg.offsets(v.name), v.index.options
            )
        else:
            k_prime = int(
                v.index.options.get("candidates_per_token", self.settings.candidates_per_token)
            )
            index = ScannTokenIndex.build(_index_rows(seg, v.name), k_prime, v.index.options)
        final = seg.index_dir(v.name)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            index.serialize(tmp)
            if self.settings.fsync:
                fsync_tree(tmp)
            os.rename(tmp, final)  # the directory's presence is the "index is complete" marker
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.settings.fsync:
            fsync_dir(seg.directory)
        if isinstance(index, MuveraIndex):  # serve the file's pages (mmap), not the build copy
            index = MuveraIndex.load(final)
        return index

    def _maybe_compact(self) -> bool:
        """Merge the smallest sealed segments (``plan_merge``: size-tiered, eager when the shard
        is idle), else rewrite one tombstone-heavy segment. The merged segment is written and
        indexed before it is swapped in; writes and searches go on meanwhile."""
        idle = self.idle()
        with self._state_lock:
            group = self._policy.compaction(self._sealed, idle, self._defer_tokens())
            if not group:
                return False
            masks = [s.deleted for s in group]
            segment_id = self._new_segment_id()
            from_indexed = any(s.indexes for s in group)
        live_rows = [np.flatnonzero(~m).astype(np.int64) for m in masks]
        merged = None
        if sum(len(r) for r in live_rows):
            merged = self._write_merged(
                segment_id,
                list(zip(group, live_rows, strict=True)),
                idle=idle,
                from_indexed=from_indexed,
            )
        with self._state_lock:
            if merged is not None:
                new_deleted = np.zeros(merged.n_objects, dtype=np.bool_)
                offset = 0
                for seg, rows in zip(group, live_rows, strict=True):
                    # Deletes that landed while we were merging carry over.
                    new_deleted[offset : offset + len(rows)] = seg.deleted[rows]
                    for j, row in enumerate(rows.tolist()):
                        uuid = seg.uuids[row]
                        cur = self._loc.get(uuid)
                        if cur is not None and cur[0] is seg and cur[1] == row:
                            self._loc[uuid] = (merged, offset + j)
                    offset += len(rows)
                merged.deleted = new_deleted
            first = self._sealed.index(group[0])
            rest = [s for s in self._sealed if all(s is not g for g in group)]
            if merged is not None:
                rest.insert(min(first, len(rest)), merged)
            self._sealed = rest
        self._checkpoint()
        for seg in group:  # open mmaps of running searches stay valid after unlink
            shutil.rmtree(seg.directory, ignore_errors=True)
            self._persisted_masks.pop(seg.segment_id, None)
        return True

    def _write_merged(
        self,
        segment_id: int,
        sources: list[tuple[SealedSegment, Any]],
        *,
        idle: bool,
        from_indexed: bool,
    ) -> SealedSegment:
        final = self._segment_dir(segment_id)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        gathered = gather_live(sources, self.spec)
        try:
            write_segment(
                tmp,
                self.spec,
                gathered.uuids,
                gathered.props_json,
                gathered.vectors,
                fsync=self.settings.fsync,
                references=self._code_references(),
                originals=gathered.originals,
            )
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The gathered rows are on disk now: free them before the index build, which reads the
        # new segment's memory-mapped file (a 6.4M-token float32 merge held 3.3 GB of copies
        # through its ScaNN build).
        del gathered
        if self.settings.fsync:
            fsync_dir(self._segments_dir)
        try:
            merged = SealedSegment(segment_id, final, self.spec)
            # Index before the swap, so a compacted segment is never searched exhaustively
            # (unless its inputs were not indexed either and it still waits, see index_due).
            tokens = self._policy.segment_tokens(merged)
            if self._policy.index_due(tokens, idle, self._defer_tokens(), from_indexed):
                for v in self.spec.vectors:
                    if self._policy.needs_index(merged, v):
                        merged.indexes[v.name] = self._build_index(merged, v)
        except BaseException:  # not referenced anywhere yet: give the space back
            shutil.rmtree(final, ignore_errors=True)
            raise
        return merged

    # ------------------------------------------------------------------ backup

    def backup(self, dest: Path) -> dict[str, Any]:
        """Write a copy of this shard to ``dest`` (a new directory) that ``ShardEngine`` opens
        with exactly the writes acknowledged before the call (``stage_backup`` then
        ``finish_backup``). Returns what was copied."""
        dest = Path(dest)
        if dest.exists():
            raise InvalidInput(f"backup destination {dest} exists", {"path": str(dest)})
        staged = self.stage_backup()
        return {"objects": staged["objects"], **self.finish_backup(Path(staged["staging"]), dest)}

    def stage_backup(self) -> dict[str, Any]:
        """Stage a copy of this shard beside its data: the manifest on disk, the segments it
        names, every WAL generation it replays from and the calibrations, exactly the writes
        acknowledged before the call. Maintenance and writes wait only while it is staged:
        segment files never change once written, so they are hard-linked; the WAL is copied
        (its last file is still appended to). The BM25 index is not copied: a restored shard
        rebuilds it from the segments and the WAL. Returns the staging directory (for
        ``finish_backup``; a staging directory left behind is removed when the shard next
        opens) and what it holds."""
        self._check_open()
        staging = self.data_dir / f"{BACKUP_STAGING_PREFIX}{os.getpid()}-{time.time_ns()}"
        try:
            with self._maint_lock, self._write_lock:
                self._check_open()
                manifest = Manifest.read(self.data_dir)
                staging.mkdir()
                for name in (MANIFEST, CALIBRATION_FILE):
                    if (self.data_dir / name).exists():
                        os.link(self.data_dir / name, staging / name)
                for entry in manifest.segments:
                    src = self._segment_dir(entry.id)
                    shutil.copytree(
                        src, staging / "segments" / src.name, copy_function=_link_or_copy
                    )
                (staging / "segments").mkdir(exist_ok=True)
                shutil.copytree(self._wal.directory, staging / "wal")
                n_objects = len(self._loc)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return {"staging": str(staging), "objects": n_objects, "segments": len(manifest.segments)}

    def finish_backup(self, staging: Path, dest: Path | str) -> dict[str, Any]:
        """Move (same filesystem) or copy a ``stage_backup`` directory to ``dest`` (a new
        directory), or upload it to ``dest`` when that is an s3:// URL, with writes and
        searches going on, and remove the staging directory."""
        staging = Path(staging)
        if staging.parent != self.data_dir or not staging.name.startswith(BACKUP_STAGING_PREFIX):
            raise InvalidInput(f"{staging} is not a backup staged by this shard")
        if isinstance(dest, str):
            return self._upload_backup(staging, dest)
        try:
            n_segments = _staged_segments(staging, dest, dest.exists())
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, dest)  # same filesystem: done
            except OSError:
                shutil.copytree(staging, dest)
                if self.settings.fsync:
                    fsync_tree(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"segments": n_segments, "bytes": dir_size_bytes(dest)}

    def _upload_backup(self, staging: Path, dest: str) -> dict[str, Any]:
        url = S3Url.parse(dest)
        try:
            store = ObjectStore()
            n_segments = _staged_segments(staging, dest, store.exists(url))
            sent = store.upload_tree(staging, url)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"segments": n_segments, "bytes": sent}

    # ------------------------------------------------------------------ lifecycle

    def start_background(self, pools: BackgroundPools | None = None) -> None:
        """Run maintenance and calibration: on two threads of this engine's own, or as steps
        of a shard host's shared pools (``shard.background``)."""
        if pools is not None:
            if self._pools is None:
                self._stop.clear()
                self._pools = pools
                self._wake = _PoolWaker(pools.maintenance, self._background_key)
                pools.maintenance.add(self._background_key, self._maintenance_step)
                pools.calibration.add(self._background_key, self._calibration_step)
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._background,
            name=f"colshard-maint-{self.spec.name}-{self.shard}",
            daemon=True,
        )
        self._thread.start()
        if self._calibrator is None or not self._calibrator.is_alive():
            self._calibrator = threading.Thread(
                target=self._calibration_loop,
                name=f"colshard-calibrate-{self.spec.name}-{self.shard}",
                daemon=True,
            )
            self._calibrator.start()

    @property
    def _background_key(self) -> str:
        return f"{self.spec.name}:{self.shard}:{id(self):x}"

    def _step(
        self, work: Callable[[], bool], what: str, backoff: _Backoff, interval: float
    ) -> float | None:
        """One round of a background loop (``shard.background``): 0 after a unit of work (more
        may be waiting), ``interval`` when there was none but the shard is active
        (``_recently_active``), None when it is idle, a back-off after a failure."""
        try:
            did = work()
        except Exception:
            wait = backoff.failed()
            logger.exception(
                "shard %s:%d: %s failed; retrying in %.1fs", self.spec.name, self.shard, what, wait
            )
            return wait
        backoff.reset()
        if did:
            return 0.0
        return interval if self._recently_active() else None

    def _maintenance_step(self) -> float | None:
        return self._step(
            self.maintenance, "maintenance", self._maintenance_backoff, BACKGROUND_INTERVAL_S
        )

    def _calibration_step(self) -> float | None:
        return self._step(
            self.recalibrate, "calibration", self._calibration_backoff, CALIBRATION_INTERVAL_S
        )

    def _recently_active(self) -> bool:
        """Written, searched or maintained in the last ``ACTIVE_WINDOW_S``: work may come due
        by time (an idle seal, indexing deferred while searches run, a calibration), so its
        background steps keep their short interval; a shard quiet for longer is idle (a pool
        checks it less and less often, and a write wakes it)."""
        last = max(self._written_at, self._last_search_at, self._worked_at)
        return time.monotonic() - last < ACTIVE_WINDOW_S

    def _calibration_loop(self) -> None:
        """Its own thread, so that maintenance (seals during an import) never waits for a
        calibration; niced like maintenance, and each calibration keeps to its duty cycle."""
        lower_priority()
        delay: float | None = CALIBRATION_INTERVAL_S
        while not self._stop.wait(CALIBRATION_INTERVAL_S if delay is None else delay):
            delay = self._calibration_step()

    def _background(self) -> None:
        lower_priority()
        wake = self._wake
        assert isinstance(wake, threading.Event)
        while not self._stop.is_set():
            delay = self._maintenance_step()
            if delay != 0.0:
                wake.wait(BACKGROUND_INTERVAL_S if delay is None else delay)
                wake.clear()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._calibrator):
            if thread is not None and thread is not threading.current_thread():
                thread.join()
        if self._pools is not None:
            self._pools.maintenance.remove(self._background_key)
            self._pools.calibration.remove(self._background_key)
        with self._maint_lock, self._write_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._wal.close()
                if self._keyword is not None:
                    self._keyword.close()
            finally:
                self._lock_file.close()  # releases the flock

    def drop(self) -> None:
        self.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass(frozen=True)
class BackgroundPools:
    """The pools a shard host's engines share: maintenance, and calibration apart from it."""

    maintenance: BackgroundPool
    calibration: BackgroundPool


class _Backoff:
    """A background loop's wait after failures: ``base`` doubling, up to ``cap``."""

    def __init__(self, base: float, cap: float) -> None:
        self._base = base
        self._cap = cap
        self._wait = base

    def failed(self) -> float:
        self._wait = min(self._wait * 2, self._cap)
        return self._wait

    def reset(self) -> None:
        self._wait = self._base


class _PoolWaker:
    """The engine's wake-up (``Event.set``) where its maintenance is a step of a pool."""

    def __init__(self, pool: BackgroundPool, key: str) -> None:
        self._pool = pool
        self._key = key

    def set(self) -> None:
        self._pool.wake(self._key)


class _Stopped(Exception):
    """The shard is closing: a calibration in progress gives up."""


def _staged_segments(staging: Path, dest: Path | str, dest_exists: bool) -> int:
    """The segments of a staged backup about to go to ``dest``; refused when ``dest`` exists
    already or nothing is staged."""
    if dest_exists:
        raise InvalidInput(f"backup destination {dest} exists", {"path": str(dest)})
    if not staging.is_dir():
        raise NotFound(f"no staged backup at {staging}", {"path": str(staging)})
    return len(list((staging / "segments").iterdir()))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links there
        shutil.copy2(src, dst)


def _present_vectors(vectors: Mapping[str, F32]) -> dict[str, F32]:
    """Named vectors the object has (zero rows = no vector under that name)."""
    return {name: m for name, m in vectors.items() if m.shape[0] > 0}


def _index_rows(seg: SealedSegment, vector: str) -> F32:
    """The rows an index is built from: a lossy-coded vector's kept originals, else its
    decoded codes (a copy for the build only, freed with it), else the stored rows."""
    originals = seg.originals(vector)
    return widen(originals.whole()) if originals is not None else all_float32(seg.tokens(vector))


def _without_index(view: SegmentView, originals: bool = True) -> SegmentView:
    """``view`` for an exact search: no token index, and with ``originals`` a lossy-coded
    vector's kept originals in place of its codes (exact MaxSim on the values written)."""
    return replace(
        view,
        vectors={
            n: replace(v, index=None, tokens=v.originals.whole(), originals=None)
            if v.originals is not None and originals
            else replace(v, index=None)
            for n, v in view.vectors.items()
        },
    )


def _allow_list(segment: Segment, n_objects: int, deleted: Bools, flt: Any) -> Bools:
    """Rows whose properties pass the filter (tombstoned rows are never evaluated)."""
    props = segment.all_properties()
    allowed = np.zeros(n_objects, dtype=np.bool_)
    for row in np.flatnonzero(~deleted).tolist():
        allowed[row] = bool(flt.matches(props[row]))
    return allowed
