"""The benchmark run: dataset → ground truth → pipelines side by side → one result document.

    run_benchmark(BenchConfig)
      ├─ dataset (cached) + exact top-100 (cached)
      ├─ job "bruteforce"   numpy exact MaxSim
      ├─ job "faiss-hnsw"   build once, sweep (efSearch, k′), 2 clients on the best ≥ 0.90
      ├─ job "faiss-ivf"    build once, sweep (nprobe, k′), 2 clients on the best ≥ 0.90
      ├─ job "engine"       colshard ShardEngine in-process: import, maintenance, search,
      │                      reopen from disk for resident memory
      ├─ job "engine-muvera" the same engine with ``index.kind = "muvera"`` (FDE candidates,
      │                      exact re-score), optionally swept over ``candidates``
      └─ http (optional)    `colshard serve` subprocess, JSON import and queries with httpx

Each job runs in its own spawned process when ``isolate`` is set (the CLI's default), so peak
RSS, resident memory and thread pools belong to one pipeline; tests run jobs in-process.
Every measurement uses the same queries, k = 10 for timing, and a separate untimed k = 100 pass
for recall@100.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench import data as bench_data
from bench.baselines import (
    BruteForce,
    FaissConfig,
    FaissTokenAnn,
    Searcher,
    SearchOutput,
    default_sweep,
    pin_threads,
)
from bench.data import Dataset, doc_index, doc_uuid
from bench.truth import GroundTruth, ground_truth
from cluster import vector_wire
from cluster.pooling import pool_batch
from cluster.types import F32, ObjectBatch, VectorColumn, VectorSearch

RECALL_BAR = 0.90  # faiss settings below this recall@10 do not count as "the best faiss"


@dataclass(frozen=True)
class BenchConfig:
    size: str = "tiny"
    noise: float = 0.6
    n_queries: int = 100
    seed: int = 0
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None
    dataset: str = "synthetic"  # "synthetic" | "minilm" | a generator of data.GENERATORS
    n_docs: int | None = None  # override the size's document count (tests)
    http: bool = False
    skip_faiss: bool = False
    faiss_kinds: tuple[str, ...] = ("hnsw", "ivf")
    skip_bruteforce: bool = False
    skip_engine: bool = False
    threads: int = 1  # BLAS / OpenMP threads per client
    isolate: bool = True  # one spawned process per pipeline
    max_bruteforce_queries: int = 50
    warmup: int = 5
    repeat: int = 1  # timed single-client passes per setting; the fastest is reported
    import_batch: int = 512  # documents per upsert
    # "interleaved": maintenance() until False after every upsert batch, as the engine's
    # background thread would (segments seal at seal_threshold_tokens); "end": only after the
    # import (one big growing segment is sealed and indexed at once).
    engine_seal: str = "interleaved"
    engine_shards: int = 1  # in-process shards (2 = the HTTP collection's layout)
    dtype: str = "float32"  # the bench vector's storage dtype (engine and HTTP collections)
    # the bench vector's codec (cluster.spec.CodecSpec form), None: the dtype's
    codec: dict[str, Any] | None = None
    pooling: int = 1  # the bench vector's pooling factor (1: none)
    engine_settings: dict[str, Any] = field(default_factory=dict)  # ShardSettings overrides
    # extra (candidates_per_token, rerank_docs or None = the engine's) settings (reopen)
    engine_kprime_sweep: tuple[tuple[int, int | None], ...] = ()
    # Index kinds of the engine runs, one job each: "scann" (the default engine), "muvera",
    # "flat". ``engine_index_options`` go into the muvera runs' ``index.options``; the muvera
    # run is also measured (reopened) at each ``engine_candidates_sweep`` value.
    engine_indexes: tuple[str, ...] = ("scann",)
    engine_index_options: dict[str, Any] = field(default_factory=dict)
    engine_candidates_sweep: tuple[int, ...] = ()
    http_batch: int = 128  # objects per JSON import request
    http_import: str = "arrow"  # "arrow": IPC streams of http_arrow_batch objects; or "json"
    http_arrow_batch: int = 2000
    http_arrow_in_flight: int = 2  # concurrent Arrow import requests (what the SDK does)
    http_timeout_s: float = 300.0
    plot: bool = True
    # Recall calibration of the engine (shard.calibrate): "off" (depth 1, no calibration),
    # "synthetic" (calibrated after the import on queries made from stored objects), or "warm"
    # (also measured after that, then warm_queries further queries of the dataset's own
    # distribution -- not the measured ones -- are served and the shards recalibrate on them,
    # as a serving shard does once traffic exists; the main record is measured after that).
    calibrate: str = "warm"
    warm_queries: int = 128

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return d


# ---------------------------------------------------------------------------------------------
# memory and environment


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of a process in bytes (Linux); {} elsewhere."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Reset VmHWM so the next reading is this phase's peak (Linux ≥ 4.0)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / f).stat().st_size
    return total


def environment() -> dict[str, Any]:
    import numpy

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "openblas_env": {
            k: os.environ[k]
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
            )
            if k in os.environ
        },
    }
    from importlib import metadata

    for dist in ("faiss-cpu", "scann", "httpx", "threadpoolctl"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    return env


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


# ---------------------------------------------------------------------------------------------
# measuring one searcher


def measure(
    searcher: Searcher,
    dataset: Dataset,
    truth: GroundTruth,
    query_ids: list[int],
    *,
    warmup: int = 5,
    concurrency: int = 2,
    recall100: bool = True,
    repeat: int = 1,
) -> dict[str, Any]:
    """Recall@10/@100, single-client latency/QPS and QPS with ``concurrency`` clients.

    The timed single-client pass runs ``repeat`` times and the fastest pass is reported (other
    tenants of a shared machine only ever make a pass slower).
    """
    for i in query_ids[:warmup]:
        searcher.search(dataset.query(i), 10)
    best: tuple[float, list[float], dict[str, float]] | None = None
    r10: list[float] = []
    cands: list[int] = []
    for rep in range(max(1, repeat)):
        lat: list[float] = []
        phases: dict[str, float] = {}
        t_start = time.perf_counter()
        for i in query_ids:
            t0 = time.perf_counter()
            out = searcher.search(dataset.query(i), 10)
            lat.append(time.perf_counter() - t0)
            if rep == 0:
                r10.append(truth.recall(i, out.doc_ids, 10))
                cands.append(out.n_candidates)
            for name, s in out.timings_s.items():
                phases[name] = phases.get(name, 0.0) + s
        wall = time.perf_counter() - t_start
        if best is None or wall < best[0]:
            best = (wall, lat, phases)
    assert best is not None
    wall, lat, phases = best
    lat_ms = np.asarray(lat) * 1e3
    result: dict[str, Any] = {
        "n_queries": len(query_ids),
        "recall_at_10": float(np.mean(r10)),
        "qps_1": len(query_ids) / wall,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "mean_ms": float(lat_ms.mean()),
        "candidates_mean": float(np.mean(cands)),
        "candidates_max": int(np.max(cands)),
        "timed_passes": max(1, repeat),
    }
    if phases:
        result["phase_ms"] = {k: 1e3 * v / len(query_ids) for k, v in phases.items()}
    if recall100:
        k100 = min(100, truth.k)
        r100 = [
            truth.recall(i, searcher.search(dataset.query(i), k100).doc_ids, k100)
            for i in query_ids
        ]
        result["recall_at_100"] = float(np.mean(r100))
    if concurrency > 1:
        result.update(measure_concurrent(searcher, dataset, truth, query_ids, concurrency))
    return result


def measure_concurrent(
    searcher: Searcher,
    dataset: Dataset,
    truth: GroundTruth,
    query_ids: list[int],
    concurrency: int,
) -> dict[str, Any]:
    """Every query once, spread over ``concurrency`` client threads; recall re-checked."""
    lock = threading.Lock()
    pending = list(query_ids)
    found: dict[int, SearchOutput] = {}

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i = pending.pop()
            out = searcher.search(dataset.query(i), 10)
            with lock:
                found[i] = out

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(client) for _ in range(concurrency)]:
                f.result()
    except Exception as exc:
        return {f"qps_{concurrency}": None, f"error_{concurrency}": repr(exc)}
    wall = time.perf_counter() - t0
    r10 = [truth.recall(i, found[i].doc_ids, 10) for i in query_ids]
    return {
        f"qps_{concurrency}": len(query_ids) / wall,
        f"recall_at_10_{concurrency}_clients": float(np.mean(r10)),
    }


# A hit's explain sums to its score: the per-token similarities come from the document's own
# float32 rows, the score from the engine's batched float32 matmul summed in float64, so the
# two agree to float32 rounding (|difference| ≤ this × max(1, Σ|sim|)).
EXPLAIN_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExplainedHit:
    doc: int  # document index (uuid lower 64 bits)
    score: float
    tokens: list[dict[str, Any]] | None  # explain: per query token {query_token, doc_token, sim}


def measure_explain(
    searcher: Any,
    dataset: Dataset,
    query_ids: list[int],
    *,
    k: int = 10,
    warmup: int = 2,
    repeat: int = 1,
    example_tokens: int = 5,
) -> dict[str, Any]:
    """``return_metadata: ["explain"]`` (per query token: the best-matching document token and
    its similarity): p50 latency of the same queries with explain off and on, interleaved query
    by query; a check that every hit's token similarities sum to its MaxSim score (one entry
    per query token); and one example (the first query's top hit).

    ``searcher.search_hits(query, k, explain)`` returns ``ExplainedHit`` s."""
    for i in query_ids[:warmup]:
        searcher.search_hits(dataset.query(i), k, True)
    lat: dict[bool, list[float]] = {False: [], True: []}
    checked = mismatches = 0
    max_diff = 0.0
    example: dict[str, Any] | None = None
    for rep in range(max(1, repeat)):
        for n, i in enumerate(query_ids):
            query = dataset.query(i)
            for explain in (False, True) if (n + rep) % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                hits = searcher.search_hits(query, k, explain)
                lat[explain].append(time.perf_counter() - t0)
                if not explain or rep:
                    continue
                for h in hits:
                    checked += 1
                    tokens = h.tokens or []
                    sims = [float(t["sim"]) for t in tokens]
                    diff = abs(sum(sims) - h.score)
                    max_diff = max(max_diff, diff)
                    if len(tokens) != len(query) or diff > EXPLAIN_TOLERANCE * max(
                        1.0, sum(abs(x) for x in sims)
                    ):
                        mismatches += 1
                if example is None and hits:
                    top = hits[0]
                    example = {
                        "query": i,
                        "doc": top.doc,
                        "score": top.score,
                        "n_query_tokens": len(query),
                        "tokens": [
                            {
                                "query_token": int(t["query_token"]),
                                "doc_token": int(t["doc_token"]),
                                "sim": float(t["sim"]),
                            }
                            for t in (top.tokens or [])[:example_tokens]
                        ],
                    }
    p50 = {e: float(np.percentile(np.asarray(v) * 1e3, 50)) for e, v in lat.items()}
    return {
        "k": k,
        "n_queries": len(query_ids),
        "passes": max(1, repeat),
        "p50_ms_off": p50[False],
        "p50_ms_on": p50[True],
        "overhead_p50_ms": p50[True] - p50[False],
        "hits_checked": checked,
        "score_mismatches": mismatches,
        "max_abs_score_diff": max_diff,
        "tolerance": EXPLAIN_TOLERANCE,
        "example": example,
    }


def _explain_or_error(
    searcher: Any, dataset: Dataset, query_ids: list[int], *, repeat: int
) -> dict[str, Any]:
    """``measure_explain``, or ``{"error": ...}``: a failing explain pass keeps the pipeline's
    other numbers."""
    try:
        return measure_explain(searcher, dataset, query_ids, repeat=repeat)
    except Exception as exc:
        return {"error": repr(exc)}


# ---------------------------------------------------------------------------------------------
# jobs (each may run in its own process)


@dataclass(frozen=True)
class Job:
    kind: str  # "bruteforce" | "faiss-hnsw" | "faiss-ivf" | "engine"
    dataset_path: str
    config: BenchConfig


def run_job(job: Job) -> list[dict[str, Any]]:
    """Entry point of one pipeline; returns result records (never raises for pipeline errors)."""
    dataset = bench_data.load(Path(job.dataset_path))
    truth = ground_truth(dataset)
    cfg = job.config
    reset_peak_rss()
    rss0 = proc_status()
    records: list[dict[str, Any]]
    with pin_threads(cfg.threads) as threads:
        try:
            if job.kind == "bruteforce":
                records = _job_bruteforce(dataset, truth, cfg)
            elif job.kind.startswith("faiss-"):
                records = _job_faiss(dataset, truth, cfg, job.kind.removeprefix("faiss-"))
            elif job.kind == "engine" or job.kind.startswith("engine-"):
                records = _job_engine(dataset, truth, cfg, job.kind.partition("-")[2] or "scann")
            else:
                raise ValueError(f"unknown job {job.kind!r}")
        except Exception as exc:
            records = [{"pipeline": job.kind, "family": job.kind, "error": repr(exc)}]
    rss1 = proc_status()
    for r in records:
        r.setdefault("threads", threads)
        r["peak_rss_mb"] = rss1.get("VmHWM", 0) / 2**20
        r["rss_start_mb"] = rss0.get("VmRSS", 0) / 2**20
        r["isolated_process"] = cfg.isolate
    return records


def _query_ids(dataset: Dataset, limit: int | None = None) -> list[int]:
    n = dataset.n_queries if limit is None else min(limit, dataset.n_queries)
    return list(range(n))


def _job_bruteforce(dataset: Dataset, truth: GroundTruth, cfg: BenchConfig) -> list[dict[str, Any]]:
    searcher = BruteForce(dataset)
    ids = _query_ids(dataset, cfg.max_bruteforce_queries)
    res = measure(
        searcher, dataset, truth, ids, warmup=min(cfg.warmup, 2), recall100=False, repeat=cfg.repeat
    )
    res["recall_at_100"] = 1.0  # exact by construction (the same kernel as the truth)
    return [
        {
            "pipeline": "numpy-bruteforce",
            "family": "bruteforce",
            "params": {},
            "build_s": 0.0,
            "index_bytes_per_token": 0.0,
            "memory_bytes_per_token": searcher.values.nbytes / dataset.n_tokens,
            **res,
        }
    ]


def _job_faiss(
    dataset: Dataset,
    truth: GroundTruth,
    cfg: BenchConfig,
    kind: str,
) -> list[dict[str, Any]]:
    ann = FaissTokenAnn(dataset, kind, seed=cfg.seed)
    idx_bytes = ann.index_bytes()
    common = {
        "family": f"faiss-{kind}",
        "build_s": ann.build_s,
        "build_params": ann.build_params,
        "index_bytes_per_token": idx_bytes / dataset.n_tokens,
        # the rerank needs the float32 corpus next to the index
        "memory_bytes_per_token": (idx_bytes + ann.values.nbytes) / dataset.n_tokens,
    }
    ids = _query_ids(dataset)
    records: list[dict[str, Any]] = []
    for config in default_sweep((kind,)):
        ann.configure(config)
        res = measure(ann, dataset, truth, ids, warmup=cfg.warmup, concurrency=1, repeat=cfg.repeat)
        records.append({"pipeline": config.label, "params": config.to_dict(), **common, **res})
    good = [r for r in records if r["recall_at_10"] >= RECALL_BAR]
    if good:
        best = max(good, key=lambda r: r["qps_1"])
        ann.configure(FaissConfig(**best["params"]))
        best.update(measure_concurrent(ann, dataset, truth, ids, 2))
    return records


def _engine_class() -> tuple[Any, str | None]:
    """(ShardEngine, None) or (None, why it is not available)."""
    if importlib.util.find_spec("shard.engine") is None:
        return None, "shard.engine is not importable here"
    try:
        module = importlib.import_module("shard.engine")
    except Exception as exc:
        return None, f"shard.engine failed to import: {exc!r}"
    cls = getattr(module, "ShardEngine", None)
    if cls is None:
        return None, "shard.engine has no ShardEngine"
    return cls, None


def engine_available() -> str | None:
    """None when the engine can be benchmarked, else the reason it cannot."""
    return _engine_class()[1]


class EngineSearcher:
    """Adapter: ShardEngine.search → document indexes (uuid lower 64 bits)."""

    def __init__(self, engine: Any, name: str = "colshard-engine") -> None:
        self.engine = engine
        self.name = name

    def search(self, query: F32, k: int) -> SearchOutput:
        res = self.engine.search(VectorSearch(target_vector="v", query=query, k=k))
        ids = np.fromiter(
            (doc_index(h.uuid) for h in res.hits), dtype=np.int64, count=len(res.hits)
        )
        return SearchOutput(ids, int(res.n_candidates))

    def search_hits(self, query: F32, k: int, explain: bool) -> list[ExplainedHit]:
        res = self.engine.search(VectorSearch(target_vector="v", query=query, k=k, explain=explain))
        return [
            ExplainedHit(
                doc_index(h.uuid), float(h.score), list(h.explain["tokens"]) if h.explain else None
            )
            for h in res.hits
        ]


class ShardedEngine:
    """N in-process ShardEngines routed like the coordinator does (jump hash of the uuid),
    searched in parallel threads and merged (score desc, uuid asc). One shard: a passthrough.

    This is the like-for-like reference for the HTTP path (same shard count, no Ray/HTTP).
    """

    def __init__(self, engine_cls: Any, spec: Any, data_dir: Path, settings: Any) -> None:
        self.spec = spec
        self.n_shards = int(spec.shard_count)
        self.shards = [
            engine_cls(spec, s, data_dir / f"shard-{s}", settings) for s in range(self.n_shards)
        ]
        self._pool = ThreadPoolExecutor(self.n_shards) if self.n_shards > 1 else None

    def upsert(self, batch: ObjectBatch) -> list[Any]:
        if self.n_shards == 1:
            return list(self.shards[0].upsert(batch))
        routes: dict[int, list[int]] = {}
        for i, u in enumerate(batch.uuids):
            routes.setdefault(self.spec.shard_for(u), []).append(i)
        out: list[Any] = []
        for s, idx in sorted(routes.items()):
            out += self.shards[s].upsert(batch.take(idx))
        return out

    def maintenance(self) -> bool:
        return any([e.maintenance() for e in self.shards])  # a list: every shard gets a turn

    def recalibrate(self) -> bool:
        """Every due calibration of every shard (what their calibration threads would do)."""
        did = False
        for e in self.shards:
            while e.recalibrate():
                did = True
        return did

    def search(self, req: VectorSearch) -> Any:
        if self._pool is None:
            return self.shards[0].search(req)
        from cluster.types import ShardSearchResult

        results = list(self._pool.map(lambda e: e.search(req), self.shards))
        hits = sorted((h for r in results for h in r.hits), key=lambda h: (-h.score, h.uuid))
        return ShardSearchResult(
            -1,
            tuple(hits[: req.k]),
            sum(r.n_candidates for r in results),
            sum(r.n_objects for r in results),
        )

    def stats(self) -> list[Any]:
        return [e.stats() for e in self.shards]

    def index_bytes(self) -> float | None:
        fns = [getattr(e, "index_bytes", None) for e in self.shards]
        if not all(callable(f) for f in fns):
            return None
        return float(sum(f() for f in fns if callable(f)))

    def close(self) -> None:
        for e in self.shards:
            e.close()
        if self._pool is not None:
            self._pool.shutdown()


def collection_dict(
    dim: int,
    shard_count: int,
    index: dict[str, Any] | None = None,
    dtype: str = "float32",
    codec: dict[str, Any] | None = None,
    pooling: int = 1,
) -> dict[str, Any]:
    vector: dict[str, Any] = {
        "name": "v",
        "kind": "multi",
        "dim": dim,
        "metric": "dot",
    }
    if codec is None or dtype != "float32":  # a float16 codec sets the dtype itself
        vector["dtype"] = dtype
    if index is not None:
        vector["index"] = index
    if codec is not None:
        vector["codec"] = codec
    if pooling > 1:
        vector["pooling"] = {"factor": pooling}
    return {"name": "Bench", "properties": [], "vectors": [vector], "shard_count": shard_count}


def codec_label(codec: dict[str, Any]) -> str:
    """``int8``, ``residual2``, ``residual4 no-originals``: the codec in a row's name."""
    label = str(codec["kind"]) + (str(codec["bits"]) if codec.get("bits") else "")
    return label + ("" if codec.get("originals", True) else " no-originals")


def parse_codec(text: str) -> dict[str, Any] | None:
    """``--codec``: ``float32`` / ``float16`` / ``int8`` / ``residual[:BITS]``, then
    ``,no-originals`` optionally; checked like a collection spec."""
    from cluster.spec import CodecSpec

    if not text:
        return None
    head, *flags = [part.strip() for part in text.split(",")]
    kind, _, bits = head.partition(":")
    raw: dict[str, Any] = {"kind": kind}
    if bits:
        raw["bits"] = int(bits)
    for flag in flags:
        if flag != "no-originals":
            raise ValueError(f"--codec: unknown flag {flag!r} (no-originals)")
        raw["originals"] = False
    return CodecSpec.from_raw(raw, "v", None).to_dict()


def engine_index(cfg: BenchConfig, kind: str, **extra: Any) -> dict[str, Any] | None:
    """The ``index`` of the bench collection for an engine run of index ``kind``."""
    if kind == "scann":
        return None  # the default: the spec exactly as before
    options = {**cfg.engine_index_options, **extra} if kind == "muvera" else {}
    return {"kind": kind, "options": options}


def batches(dataset: Dataset, batch_docs: int) -> Iterator[tuple[int, int]]:
    for start in range(0, dataset.n_docs, batch_docs):
        yield start, min(start + batch_docs, dataset.n_docs)


def object_batch(dataset: Dataset, start: int, stop: int) -> ObjectBatch:
    t0, t1 = int(dataset.offsets[start]), int(dataset.offsets[stop])
    values = np.ascontiguousarray(dataset.values[t0:t1], dtype=np.float32)
    offsets = (dataset.offsets[start : stop + 1] - t0).astype(np.int64)
    uuids = tuple(doc_uuid(i) for i in range(start, stop))
    return ObjectBatch(uuids, tuple({} for _ in uuids), {"v": VectorColumn(values, offsets)})


def _job_engine(
    dataset: Dataset, truth: GroundTruth, cfg: BenchConfig, index_kind: str = "scann"
) -> list[dict[str, Any]]:
    from cluster.settings import ShardSettings
    from cluster.spec import CollectionSpec

    family = "colshard" if index_kind == "scann" else f"colshard-{index_kind}"
    name = "colshard-engine" + ("" if index_kind == "scann" else f" {index_kind}")
    engine_cls, why = _engine_class()
    if engine_cls is None:
        return [{"pipeline": name, "family": family, "skipped": why}]
    index = engine_index(cfg, index_kind)
    spec = CollectionSpec.from_dict(
        collection_dict(dataset.dim, cfg.engine_shards, index, cfg.dtype, cfg.codec, cfg.pooling)
    )
    settings = ShardSettings(**cfg.engine_settings)
    name += f" {cfg.engine_shards} shards" if cfg.engine_shards > 1 else ""
    name += f" {cfg.dtype}" if cfg.dtype != "float32" else ""
    name += f" {codec_label(cfg.codec)}" if cfg.codec else ""
    name += f" pool{cfg.pooling}" if cfg.pooling > 1 else ""
    record: dict[str, Any] = {
        "pipeline": name,
        "family": family,
        "params": {
            **asdict(settings),
            "shards": cfg.engine_shards,
            "index": spec.vectors[0].index.to_dict(),
            "dtype": cfg.dtype,
            "codec": spec.vectors[0].codec.to_dict(),
        },
        "notes": [],
    }
    if index_kind == "muvera":
        from cluster.spec import MUVERA_DEFAULTS

        record["params"]["candidates"] = spec.vectors[0].index.options.get(
            "candidates", MUVERA_DEFAULTS["candidates"]
        )
    data_dir = Path(tempfile.mkdtemp(prefix="colshard-bench-engine-"))
    try:
        # During the import the shard is never idle: this loop runs maintenance between
        # batches, but a real shard's background thread merges while writes keep arriving.
        # (An idle time that never passes, not 0: seal_idle_s 0 also turns deferred indexing
        # off.)
        never_idle = 1e9 if settings.seal_idle_s > 0 else 0.0
        import_settings = ShardSettings(**{**cfg.engine_settings, "seal_idle_s": never_idle})
        engine = ShardedEngine(engine_cls, spec, data_dir, import_settings)
        import_s = build_s = 0.0
        failed = rounds = 0

        def maintain() -> tuple[float, int]:
            t0 = time.perf_counter()
            n = 0
            while engine.maintenance():
                n += 1
            return time.perf_counter() - t0, n

        for start, stop in batches(dataset, cfg.import_batch):
            batch = object_batch(dataset, start, stop)
            t0 = time.perf_counter()
            batch = pool_batch(spec, batch)  # what the coordinator does before routing
            results = engine.upsert(batch)
            import_s += time.perf_counter() - t0
            failed += sum(1 for r in results if not r.ok)
            if cfg.engine_seal == "interleaved":  # what the background thread would do
                spent, n = maintain()
                build_s += spent
                rounds += n
        spent, n = maintain()
        build_s += spent
        rounds += n
        # What a shard does once the import settles: after seal_idle_s without writes it seals
        # and indexes the growing segment's tail and merges eagerly (reopened with the real
        # settings; the wait is not build time).
        idle_build_s = 0.0
        if settings.seal_idle_s > 0:
            engine.close()
            engine = ShardedEngine(engine_cls, spec, data_dir, settings)
            time.sleep(settings.seal_idle_s + 0.05)
            idle_build_s, n = maintain()
            build_s += idle_build_s
            rounds += n
        searcher = EngineSearcher(engine)
        records: list[dict[str, Any]] = []
        if cfg.calibrate != "off":
            record["calibration"] = _calibrate(engine)
            if cfg.calibrate == "warm":  # the synthetic calibration's figures, then warm up
                first = measure(
                    searcher,
                    dataset,
                    truth,
                    _query_ids(dataset),
                    warmup=cfg.warmup,
                    repeat=cfg.repeat,
                )
                records.append(
                    {
                        "pipeline": f"{name} (synthetic calibration)",
                        "family": f"{family}-calibration",
                        "params": record["params"],
                        **first,
                    }
                )
                for shard in engine.shards:  # the measured queries must not calibrate it
                    shard.forget_queries()
                for q in warm_queries(cfg):
                    searcher.search(q, 10)
                record["calibration_warm"] = _calibrate(engine)
        stats = engine.stats()
        record.update(
            {
                "idle_build_s": idle_build_s,
                "n_segments": sum(int(getattr(st, "n_segments", 0)) for st in stats),
                "import_s": import_s,
                "import_tokens_per_s": dataset.n_tokens / import_s,
                "ingest_tokens_per_s": dataset.n_tokens / (import_s + build_s),
                "import_failed": failed,
                "build_s": build_s,
                "maintenance_rounds": rounds,
                "seal_mode": cfg.engine_seal,
                "stats": _jsonable(stats),
                "disk_bytes_per_token": dir_bytes(data_dir) / dataset.n_tokens,
                "index_disk_bytes_per_token": _index_dir_bytes(data_dir) / dataset.n_tokens,
            }
        )
        record.update(
            measure(
                searcher, dataset, truth, _query_ids(dataset), warmup=cfg.warmup, repeat=cfg.repeat
            )
        )
        record["explain"] = _explain_or_error(
            searcher, dataset, _query_ids(dataset), repeat=cfg.repeat
        )
        engine.close()
        del engine, searcher
        record.update(
            _fresh_process(
                _engine_resident, str(dataset.path), spec.to_dict(), asdict(settings), str(data_dir)
            )
        )
        # The candidate index's size: what the engine reports, else its serialized size
        # (ScaNN loads the same arrays into memory). No index at all: every segment is exact.
        reported = record.pop("engine_index_bytes", None)
        record["index_bytes_per_token"] = (
            reported / dataset.n_tokens
            if reported is not None
            else record["index_disk_bytes_per_token"]
        )
        if not record["index_disk_bytes_per_token"]:
            record["notes"].append(
                "no token index was built: every segment searched exactly "
                "(corpus below seal_threshold_tokens / "
                "brute_force_max_tokens?)"
            )
        records.insert(0, record)
        for c in cfg.engine_candidates_sweep if index_kind == "muvera" else ():
            spec_c = CollectionSpec.from_dict(
                collection_dict(
                    dataset.dim,
                    cfg.engine_shards,
                    engine_index(cfg, index_kind, candidates=c),
                    cfg.dtype,
                    cfg.codec,
                    cfg.pooling,
                )
            )
            engine = ShardedEngine(engine_cls, spec_c, data_dir, settings)
            res = measure(
                EngineSearcher(engine),
                dataset,
                truth,
                _query_ids(dataset),
                warmup=cfg.warmup,
                concurrency=1,
                repeat=cfg.repeat,
            )
            engine.close()
            records.append(
                {
                    "pipeline": f"{name} C{c}",
                    "family": f"{family}-sweep",
                    "params": {
                        **asdict(settings),
                        "shards": cfg.engine_shards,
                        "index": spec_c.vectors[0].index.to_dict(),
                        "candidates": c,
                    },
                    **res,
                }
            )
        for kp, rerank in cfg.engine_kprime_sweep if index_kind == "scann" else ():
            # exactly these values: no calibrated depth on top
            extra: dict[str, Any] = {"candidates_per_token": kp, "calibration_queries": 0}
            if rerank is not None:
                extra["rerank_docs"] = rerank
            settings_k = ShardSettings(**{**cfg.engine_settings, **extra})
            engine = ShardedEngine(engine_cls, spec, data_dir, settings_k)
            res = measure(
                EngineSearcher(engine),
                dataset,
                truth,
                _query_ids(dataset),
                warmup=cfg.warmup,
                concurrency=1,
                repeat=cfg.repeat,
            )
            engine.close()
            label = f"k'{kp}" + (f"/r{rerank}" if rerank is not None else "")
            records.append(
                {
                    "pipeline": f"{name} {label}",
                    "family": "colshard-sweep",
                    "params": {**asdict(settings_k), "shards": cfg.engine_shards},
                    **res,
                }
            )
        return records
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _calibrate(engine: ShardedEngine) -> dict[str, Any]:
    """Run every due calibration now; its wall and CPU time (this process: threads pinned by
    the job) and each shard's report."""
    t0, c0 = time.perf_counter(), time.process_time()
    engine.recalibrate()
    return {
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "shards": [_jsonable(st.calibration) for st in engine.stats()],
    }


def _index_dir_bytes(data_dir: Path) -> int:
    """Bytes of the engine's serialized token indexes (``index-*`` directories)."""
    return sum(dir_bytes(p) for p in data_dir.rglob("index-*") if p.is_dir())


def _fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a new spawned process: memory readings owe nothing to this one."""
    try:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    except Exception as exc:
        return {"resident_error": repr(exc)}


def _engine_resident(
    dataset_path: str, spec_dict: dict[str, Any], settings_dict: dict[str, Any], data_dir: str
) -> dict[str, Any]:
    """Open the engine from disk in this fresh process, warm it up with 20 queries, and report
    how much memory it holds: anonymous (indexes and anything loaded into RAM) and file-backed
    (memory-mapped segments) resident bytes per token."""
    from cluster.settings import ShardSettings
    from cluster.spec import CollectionSpec

    dataset = bench_data.load(Path(dataset_path))
    truth = ground_truth(dataset)
    engine_cls, why = _engine_class()
    if engine_cls is None:
        return {"resident_error": why}
    gc.collect()
    before = proc_status()
    t0 = time.perf_counter()
    engine = ShardedEngine(
        engine_cls,
        CollectionSpec.from_dict(spec_dict),
        Path(data_dir),
        ShardSettings(**settings_dict),
    )
    open_s = time.perf_counter() - t0
    searcher = EngineSearcher(engine)
    r10 = [
        truth.recall(i, searcher.search(dataset.query(i), 10).doc_ids, 10)
        for i in _query_ids(dataset, 20)
    ]
    after = proc_status()
    reported = None
    with contextlib.suppress(Exception):
        reported = engine.index_bytes()
    engine.close()
    n = dataset.n_tokens
    return {
        "reopen_s": open_s,
        "reopen_recall_at_10": float(np.mean(r10)),
        "resident_anon_bytes_per_token": (after.get("RssAnon", 0) - before.get("RssAnon", 0)) / n,
        "resident_file_bytes_per_token": (after.get("RssFile", 0) - before.get("RssFile", 0)) / n,
        "engine_index_bytes": reported,
    }


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return repr(obj)


# ---------------------------------------------------------------------------------------------
# colshard end to end over HTTP


class HttpSearcher:
    """near_vector queries against a running colshard gateway (JSON bodies, the query matrix
    in binary form as the SDK sends it)."""

    name = "colshard-http"

    def __init__(
        self,
        base_url: str,
        client_factory: Callable[[], Any] | None = None,
        collection: str = "Bench",
        timeout_s: float = 60.0,
    ) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.collection = collection
        self._factory = client_factory or (lambda: httpx.Client(timeout=timeout_s))
        self._local = threading.local()  # one connection pool per client thread
        # Queries go over the standard library's keep-alive http.client: ~0.4 ms less client
        # CPU per request than httpx (0.71–0.96 vs 1.16–1.24 ms against a gateway with a fake
        # coordinator), which is the client's cost, not colshard's. Tests inject httpx mocks.
        url = urllib.parse.urlsplit(self.base_url)
        self._stdlib = client_factory is None and url.scheme == "http"
        self._host, self._port = url.hostname or "127.0.0.1", url.port or 80
        self._timeout_s = timeout_s
        self._query_path = f"{url.path}/v1/collections/{collection}/query"

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._factory()
        return client

    def _query(self, body: bytes) -> Any:
        """POST a query body; the decoded JSON answer (RuntimeError on an HTTP error)."""
        if not self._stdlib:
            resp = self._client().post(
                f"{self.base_url}/v1/collections/{self.collection}/query",
                content=body,
                headers={"content-type": "application/json"},
            )
            _check(resp)
            return orjson.loads(resp.content)
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout_s
                )
            try:
                conn.request(
                    "POST",
                    self._query_path,
                    body=body,
                    headers={"content-type": "application/json"},
                )
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()  # the server closed the kept-alive connection: once more
                self._local.conn = None
                if attempt:
                    raise
        if resp.status >= 400:
            raise RuntimeError(f"HTTP {resp.status}: {data[:500].decode(errors='replace')}")
        return orjson.loads(data)

    def search(self, query: F32, k: int) -> SearchOutput:
        # The binary form the SDK sends (cluster.vector_wire): 25 µs to write, where decimal
        # text takes ~75 µs with orjson and ~2 ms with json.dumps(query.tolist()).
        body = orjson.dumps(
            {
                "near_vector": {"vector": vector_wire.encode(query)},
                "target_vector": "v",
                "limit": k,
                "return_metadata": ["score"],
            }
        )
        body_out = self._query(body)
        objects = body_out["objects"]
        ids = np.fromiter((doc_index(o["id"]) for o in objects), dtype=np.int64, count=len(objects))
        took = body_out.get("took_ms")  # the server's own time: the rest is HTTP + JSON
        return SearchOutput(ids, 0, {"server": float(took) / 1e3} if took is not None else {})

    def search_hits(self, query: F32, k: int, explain: bool) -> list[ExplainedHit]:
        metadata = ["score", "explain"] if explain else ["score"]
        body = orjson.dumps(
            {
                "near_vector": {"vector": vector_wire.encode(query)},
                "target_vector": "v",
                "limit": k,
                "return_metadata": metadata,
            }
        )
        hits = []
        for o in self._query(body)["objects"]:
            meta = o.get("metadata") or {}
            tokens = (meta.get("explain") or {}).get("tokens")
            hits.append(
                ExplainedHit(
                    doc_index(o["id"]),
                    float(meta["score"]),
                    list(tokens) if tokens is not None else None,
                )
            )
        return hits

    def create(
        self,
        dim: int,
        shard_count: int = 2,
        dtype: str = "float32",
        codec: dict[str, Any] | None = None,
        pooling: int = 1,
    ) -> None:
        _check(
            self._client().post(
                f"{self.base_url}/v1/collections",
                json=collection_dict(dim, shard_count, dtype=dtype, codec=codec, pooling=pooling),
            )
        )

    def import_dataset(self, dataset: Dataset, batch_docs: int) -> tuple[float, int]:
        """JSON import; returns (seconds spent in requests, failed objects)."""
        spent = 0.0
        failed = 0
        url = f"{self.base_url}/v1/collections/{self.collection}/objects"
        for start, stop in batches(dataset, batch_docs):
            objects = [
                {"id": doc_uuid(i), "properties": {}, "vectors": {"v": dataset.doc(i).tolist()}}
                for i in range(start, stop)
            ]
            payload = json.dumps({"objects": objects}).encode()
            t0 = time.perf_counter()
            resp = self._client().post(
                url, content=payload, headers={"content-type": "application/json"}
            )
            spent += time.perf_counter() - t0
            _check(resp)
            failed += _count_failed(resp.json())
        return spent, failed

    def import_arrow(
        self, dataset: Dataset, batch_docs: int, in_flight: int = 2
    ) -> tuple[float, int]:
        """Arrow IPC import (``application/vnd.apache.arrow.stream``), ``in_flight`` requests
        at a time like the SDK's ``insert_arrow``; returns (wall seconds from the first request
        to the last answer, failed objects). Bodies are encoded before the clock starts."""
        import pyarrow as pa

        url = f"{self.base_url}/v1/collections/{self.collection}/objects"
        bodies = []
        for start, stop in batches(dataset, batch_docs):
            lengths = np.diff(dataset.offsets[start : stop + 1])
            flat = np.asarray(
                dataset.values[dataset.offsets[start] : dataset.offsets[stop]], dtype=np.float32
            )
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dataset.dim)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            vectors = pa.ListArray.from_arrays(pa.array(offsets), inner)
            table = pa.table({"id": [doc_uuid(i) for i in range(start, stop)], "v": vectors})
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            bodies.append(sink.getvalue().to_pybytes())

        def post(payload: bytes) -> int:
            # 1 MB slices with the body's Content-Length, as the SDK sends it: httpcore would
            # copy the rest of a 32 MB bytes body again after every partial socket send.
            view = memoryview(payload)
            resp = self._client().post(
                url,
                content=[view[i : i + (1 << 20)] for i in range(0, len(view), 1 << 20)],
                headers={
                    "content-type": "application/vnd.apache.arrow.stream",
                    "content-length": str(len(view)),
                },
            )
            _check(resp)
            return _count_failed(resp.json())

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, in_flight)) as pool:
            failed = sum(pool.map(post, bodies))
        return time.perf_counter() - t0, failed

    def calibration(self) -> list[dict[str, Any]]:
        """Each shard's calibration report for the bench vector (collection stats)."""
        resp = self._client().get(f"{self.base_url}/v1/collections/{self.collection}")
        _check(resp)
        return [
            dict((s.get("stats") or {}).get("calibration", {}).get("v", {}))
            for s in resp.json()["shards"]
        ]

    def cluster(self) -> Any:
        resp = self._client().get(f"{self.base_url}/v1/cluster")
        return resp.json() if resp.status_code == 200 else {"status": resp.status_code}


def _check(resp: Any) -> None:
    if resp.status_code >= 400:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")


def _count_failed(body: Any) -> int:
    items = body.get("results", body.get("objects", [])) if isinstance(body, dict) else body
    if not isinstance(items, list):
        return 0
    return sum(
        1
        for r in items
        if isinstance(r, dict)
        and (r.get("ok") is False or r.get("status") == "FAILED" or r.get("error"))
    )


def _free_port(pair: bool = False) -> int:
    """A free loopback port (with ``pair``: one whose successor is free too, for etcd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair found")


def _session_rss(sid: int) -> dict[str, float]:
    """Summed VmRSS and VmHWM (MB) of every process in session ``sid`` (the server tree)."""
    rss = hwm = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # fields after ")" : state ppid pgrp session ...
                st = proc_status(p.name)
                rss += st.get("VmRSS", 0)
                hwm += st.get("VmHWM", 0)
    return {"server_rss_mb": rss / 2**20, "server_peak_rss_mb_sum": hwm / 2**20}


def run_http(dataset: Dataset, truth: GroundTruth, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Start `colshard serve`, import over JSON, query, stop the server."""
    exe = shutil.which("colshard")
    if exe is None:
        return [
            {
                "pipeline": "colshard-http",
                "family": "colshard-http",
                "skipped": "`colshard` CLI not on PATH",
            }
        ]
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = cfg.out_dir / "colshard-serve.log"
    record: dict[str, Any] = {
        "pipeline": "colshard-http",
        "family": "colshard-http",
        "params": {"shard_count": 2},
        "log": str(log_path),
    }
    calibration = ["--calibration-queries", "0"] if cfg.calibrate == "off" else []
    try:
        with served(exe, log_path, calibration, cfg.http_timeout_s, record) as (
            proc,
            base,
            data_dir,
        ):
            searcher = HttpSearcher(base, timeout_s=cfg.http_timeout_s)
            searcher.create(dataset.dim, 2, cfg.dtype, cfg.codec, cfg.pooling)
            if cfg.http_import == "arrow":
                spent, failed = searcher.import_arrow(
                    dataset, cfg.http_arrow_batch, cfg.http_arrow_in_flight
                )
                record["import_format"] = (
                    f"arrow, {cfg.http_arrow_batch} objects/request, "
                    f"{cfg.http_arrow_in_flight} in flight"
                )
            else:
                spent, failed = searcher.import_dataset(dataset, cfg.http_batch)
                record["import_format"] = f"json, {cfg.http_batch} objects/request"
            record.update(
                {
                    "import_s": spent,
                    "import_tokens_per_s": dataset.n_tokens / spent,
                    "import_failed": failed,
                }
            )
            record["build_wait_s"], record["cluster"] = _wait_settled(
                searcher, proc.pid, time.monotonic() + cfg.http_timeout_s
            )
            if cfg.calibrate != "off":
                record["calibration"] = _wait_calibrated(searcher, 0, cfg.http_timeout_s)
                if cfg.calibrate == "warm":
                    # Warm queries first: the shards recalibrate on them before they see a
                    # measured query (the in-engine run also reports the synthetic calibration).
                    for q in warm_queries(cfg):
                        searcher.search(q, 10)
                    record["calibration_warm"] = _wait_calibrated(searcher, 1, cfg.http_timeout_s)
            record.update(
                measure(
                    searcher,
                    dataset,
                    truth,
                    _query_ids(dataset),
                    warmup=cfg.warmup,
                    repeat=cfg.repeat,
                )
            )
            record["explain"] = _explain_or_error(
                searcher, dataset, _query_ids(dataset), repeat=cfg.repeat
            )
            record.update(_session_rss(proc.pid))
            etcd_bytes = dir_bytes(data_dir / "_etcd")  # the embedded etcd's WAL, not the data
            record["disk_bytes_per_token"] = (dir_bytes(data_dir) - etcd_bytes) / dataset.n_tokens
    except Exception as exc:
        record["error"] = f"{exc!r}; log tail: {_tail(log_path)}"
    return [record]


@contextlib.contextmanager
def served(
    exe: str, log_path: Path, extra: Sequence[str], timeout_s: float, record: dict[str, Any]
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``colshard serve`` on free ports and a fresh data dir, ready: ``(process, base URL,
    data dir)``. Startup time, the port and how it stopped go into ``record``. Stopped and
    its data dir removed afterwards, whatever happened."""
    port = _free_port()
    etcd_port = _free_port(pair=True)  # the embedded etcd's client and peer ports
    data_dir = Path(tempfile.mkdtemp(prefix="colshard-bench-http-"))
    record.setdefault("params", {})["port"] = port
    # Serve the same source tree this harness runs from (an editable install may point at
    # another checkout): its root goes first on the server's PYTHONPATH.
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    if (root / "gateway").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
        record["server_code_root"] = str(root)
    argv = [exe, "serve", "--data-dir", str(data_dir), "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*argv, "--etcd-port", str(etcd_port), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"colshard serve exited with {proc.returncode}: {_tail(log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"colshard serve not ready after {timeout_s} s")
            time.sleep(0.5)
        record["startup_s"] = time.perf_counter() - t0
        yield proc, base, data_dir
    finally:
        record["shutdown"] = _stop_server(proc)
        shutil.rmtree(data_dir, ignore_errors=True)


def _wait_calibrated(
    searcher: HttpSearcher, min_real: int, timeout_s: float
) -> list[dict[str, Any]]:
    """Until every shard has calibrated (on at least ``min_real`` real queries) and has no
    calibration due; each shard's report."""
    deadline = time.monotonic() + timeout_s
    while True:
        cals = searcher.calibration()
        if all(
            c.get("state") != "pending"
            and c.get("due") is None
            and (c.get("state") != "calibrated" or c["measured"]["real_queries"] >= min_real)
            for c in cals
        ):
            return cals
        if time.monotonic() > deadline:
            raise TimeoutError(f"shards not calibrated after {timeout_s} s: {cals}")
        time.sleep(1.0)


def _session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of session ``sid``."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _wait_settled(
    searcher: HttpSearcher,
    sid: int,
    deadline: float,
    idle_cores: float = 0.3,
    window_s: float = 2.0,
) -> tuple[float, Any]:
    """Wait until the server is idle: background seals and index builds have finished.

    GET /v1/cluster does not report index state, so the signal is the server's CPU use:
    three windows in a row below ``idle_cores``.
    """
    t0 = time.perf_counter()
    quiet = 0
    last = _session_cpu_s(sid)
    while time.monotonic() < deadline and quiet < 3:
        time.sleep(window_s)
        now = _session_cpu_s(sid)
        quiet = quiet + 1 if (now - last) / window_s < idle_cores else 0
        last = now
    return time.perf_counter() - t0, searcher.cluster()


def _stop_server(proc: subprocess.Popen[bytes]) -> str:
    """SIGINT (graceful: Ray and etcd shut down), then SIGTERM / SIGKILL to its session.

    Only the session created for the server is signalled, never processes by name.
    """
    steps = ((signal.SIGINT, 60.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0))
    for sig, wait_s in steps:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == signal.SIGINT:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)  # the session we created for the server
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _session_alive(proc.pid):
                return f"stopped after {sig.name}"
            time.sleep(0.25)
    return "processes left in its session"


def _session_alive(sid: int) -> bool:
    return _session_rss(sid)["server_rss_mb"] > 0


def _tail(path: Path, n: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


# ---------------------------------------------------------------------------------------------
# the whole run


def load_dataset(cfg: BenchConfig, n_queries: int | None = None) -> Dataset:
    """The run's dataset with ``n_queries`` queries (default ``cfg.n_queries``; query i is the
    same whatever the count)."""
    n = cfg.n_queries if n_queries is None else n_queries
    if cfg.dataset == "minilm":
        return bench_data.minilm(n_queries=n, seed=cfg.seed, cache_dir=cfg.cache_dir)
    if cfg.dataset in bench_data.GENERATORS:
        return bench_data.generated(
            cfg.dataset, seed=cfg.seed, n_queries=n, cache_dir=cfg.cache_dir, n_docs=cfg.n_docs
        )
    return bench_data.synthetic(
        cfg.size,
        noise=cfg.noise,
        seed=cfg.seed,
        n_queries=n,
        cache_dir=cfg.cache_dir,
        n_docs=cfg.n_docs,
    )


def warm_queries(cfg: BenchConfig) -> list[F32]:
    """``cfg.warm_queries`` queries of the dataset's distribution that are not measured: the
    ones after the measured ``cfg.n_queries``."""
    if cfg.warm_queries <= 0:
        return []
    extra = load_dataset(cfg, cfg.n_queries + cfg.warm_queries)
    return [np.asarray(extra.query(i)) for i in range(cfg.n_queries, extra.n_queries)]


def _run_jobs(jobs: list[Job], isolate: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for job in jobs:
        t0 = time.perf_counter()
        log(f"[bench] {job.kind} ...")
        if isolate:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                try:
                    records = pool.submit(run_job, job).result()
                except Exception as exc:
                    records = [{"pipeline": job.kind, "family": job.kind, "error": repr(exc)}]
        else:
            records = run_job(job)
        for r in records:
            r["job_wall_s"] = time.perf_counter() - t0
        log(f"[bench] {job.kind} done in {time.perf_counter() - t0:.1f} s")
        out.extend(records)
    return out


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every selected pipeline on one dataset; returns the result document."""
    t0 = time.perf_counter()
    dataset = load_dataset(cfg)
    t_data = time.perf_counter() - t0
    log(
        f"[bench] dataset {dataset.key}: {dataset.n_docs} docs, {dataset.n_tokens} tokens "
        f"({t_data:.1f} s)"
    )
    truth = ground_truth(dataset)
    log(
        f"[bench] exact top-{truth.k} for {dataset.n_queries} queries ({truth.build_s:.1f} s "
        f"when computed)"
    )
    assert dataset.path is not None
    kinds: list[str] = []
    if not cfg.skip_engine:
        kinds += ["engine" if k == "scann" else f"engine-{k}" for k in cfg.engine_indexes]
    if not cfg.skip_bruteforce:
        kinds.append("bruteforce")
    if not cfg.skip_faiss:
        kinds += [f"faiss-{k}" for k in cfg.faiss_kinds]
    jobs = [Job(k, str(dataset.path), cfg) for k in kinds]
    results = _run_jobs(jobs, cfg.isolate, log)
    if cfg.http:
        log("[bench] colshard over HTTP ...")
        with pin_threads(cfg.threads):
            results += run_http(dataset, truth, cfg)
    from bench.report import summarize

    doc: dict[str, Any] = {
        "config": cfg.to_dict(),
        "environment": environment(),
        "dataset": {**dataset.describe(), "generate_s": t_data, "truth_s": truth.build_s},
        "results": results,
    }
    doc["summary"] = summarize(doc)
    doc["wall_s"] = time.perf_counter() - t0
    return doc


def run_many_collections(
    n: int, out_dir: Path, timeout_s: float = 600.0, dim: int = 128
) -> dict[str, Any]:
    """``colshard serve`` holding ``n`` small collections of 2 shards each on this one node:
    how long creating them takes, what an idle shard costs in its shard host (private memory,
    ``/proc/<pid>/smaps_rollup``), that each still answers, and that deleting them frees
    the host. The issue #19 target: 1,000 collections, ≤ 20 MB per idle shard."""
    import httpx

    from shard.host import private_memory_bytes

    exe = shutil.which("colshard")
    if exe is None:
        return {"skipped": "`colshard` CLI not on PATH"}
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "colshard-serve.log"
    record: dict[str, Any] = {"collections": n, "shards": 2 * n, "log": str(log_path)}
    extra = ["--max-collections", str(n + 1)]
    rng = np.random.default_rng(0)

    def create(http: httpx.Client, name: str) -> None:
        vec = {"name": "v", "dim": dim, "kind": "multi", "metric": "dot"}
        body = {"name": name, "shard_count": 2, "vectors": [vec]}
        r = http.post("/v1/collections", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"create {name}: {r.status_code} {r.text[:300]}")

    def host_pids(http: httpx.Client) -> set[int]:
        cluster = http.get("/v1/cluster").json()
        return {
            int(p["pid"])
            for c in cluster["collections"].values()
            for p in c["placements"]
            if p.get("pid")
        }

    try:
        with (
            served(exe, log_path, extra, timeout_s, record) as (proc, base, _data),
            httpx.Client(base_url=base, timeout=timeout_s) as http,
        ):
            create(http, "Warm")  # the host exists and has loaded what a shard needs
            doc = rng.normal(size=(32, dim)).round(4).tolist()
            one = {"objects": [{"properties": {}, "vectors": {"v": doc}}]}
            http.post("/v1/collections/Warm/objects", json=one).raise_for_status()
            query = {"near_vector": {"vector": doc[:4]}, "limit": 1}
            http.post("/v1/collections/Warm/query", json=query).raise_for_status()
            time.sleep(2.0)
            pids = host_pids(http)
            before = sum(private_memory_bytes(p) for p in pids)
            t0 = time.perf_counter()
            for i in range(n):
                create(http, f"Many{i}")
            record["create_s"] = time.perf_counter() - t0
            time.sleep(5.0)
            pids = host_pids(http)
            after = sum(private_memory_bytes(p) for p in pids)
            record.update(
                host_processes=len(pids),
                host_private_mb_before=before / 2**20,
                host_private_mb_after=after / 2**20,
                private_mb_per_idle_shard=(after - before) / (2 * n) / 2**20,
                server_session=_session_rss(proc.pid),
            )
            last = f"Many{n - 1}"
            http.post(f"/v1/collections/{last}/objects", json=one).raise_for_status()
            hits = http.post(f"/v1/collections/{last}/query", json=query).json()["objects"]
            record["last_collection_answers"] = len(hits) == 1
            t0 = time.perf_counter()
            for i in range(n):
                http.delete(f"/v1/collections/Many{i}").raise_for_status()
            record["delete_s"] = time.perf_counter() - t0
    except Exception as exc:
        record["error"] = f"{exc!r}; log tail: {_tail(log_path)}"
    return record
