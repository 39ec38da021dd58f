"""A bounded load test against a running gateway: ``colshard load`` (and
``tests/integration/test_load.py``).

Several concurrent async clients (httpx) run for ``duration_s`` against one collection of their
own: writers upsert batches of multi-vector objects drawn from a fixed pool of ids (so the data
set stops growing once the pool is written and memory can be judged), readers run
``near_vector``, ``bm25`` and fetch-by-id. Every non-2xx answer or transport error counts as an
error. Meanwhile the resident memory (RSS) of every colshard process on this host is sampled:
the gateway (``gateway_pids``), and the coordinator and shard actor workers named by
``GET /v1/cluster`` (``pid`` fields of members and placements whose ``host`` is this host).

The report gives requests, errors, p50/p99 latency per operation and overall, and per process
the RSS at the end of the warm-up and at the end, so ``growth_after_warmup_mb`` exposes a leak::

    colshard load --url http://127.0.0.1:8080 --duration-s 600 --clients 16
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

WORDS = (
    "cat",
    "dog",
    "wine",
    "cheese",
    "river",
    "mountain",
    "search",
    "vector",
    "token",
    "shard",
    "query",
    "paper",
    "music",
    "garden",
    "engine",
    "night",
)


@dataclass(frozen=True)
class LoadConfig:
    url: str
    api_key: str | None = None
    duration_s: float = 30.0
    warmup_s: float = 8.0
    clients: int = 8
    write_fraction: float = 0.3
    dim: int = 32
    min_tokens: int = 4
    max_tokens: int = 24
    batch_size: int = 16
    id_pool: int = 2_000
    query_tokens: int = 8
    limit: int = 10
    shard_count: int = 2
    sample_every_s: float = 0.5
    gateway_pids: tuple[int, ...] = ()
    keep_collection: bool = False
    seed: int = 0
    request_timeout_s: float = 60.0


@dataclass
class OpStats:
    n: int = 0
    errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0


@dataclass
class ProcessMemory:
    label: str
    pid: int
    start_mb: float = 0.0
    warmup_mb: float = 0.0
    end_mb: float = 0.0
    max_mb: float = 0.0
    samples: int = 0

    @property
    def growth_after_warmup_mb(self) -> float:
        return self.end_mb - self.warmup_mb


@dataclass
class LoadReport:
    collection: str
    duration_s: float
    requests: int
    errors: int
    error_samples: list[str]
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    ops: dict[str, OpStats]
    memory: list[ProcessMemory] = field(default_factory=list)
    objects_written: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for mem, row in zip(self.memory, out["memory"], strict=True):
            row["growth_after_warmup_mb"] = round(mem.growth_after_warmup_mb, 1)
        return out

    def format(self) -> str:
        lines = [
            f"collection {self.collection}: {self.requests} requests in "
            f"{self.duration_s:.1f} s ({self.requests_per_s:.1f}/s), {self.errors} errors, "
            f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
            f"{self.objects_written} objects written"
        ]
        for name, op in sorted(self.ops.items()):
            lines.append(
                f"  {name:<12} n={op.n:<6} errors={op.errors:<4} p50={op.p50_ms:8.1f} ms "
                f"p99={op.p99_ms:8.1f} ms max={op.max_ms:8.1f} ms"
            )
        for mem in self.memory:
            lines.append(
                f"  rss {mem.label:<28} pid {mem.pid:<7} start {mem.start_mb:7.1f} MB "
                f"warm {mem.warmup_mb:7.1f} MB end {mem.end_mb:7.1f} MB "
                f"max {mem.max_mb:7.1f} MB growth {mem.growth_after_warmup_mb:+7.1f} MB"
            )
        lines.extend(f"  error: {e}" for e in self.error_samples)
        return "\n".join(lines)


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (Linux /proc), None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def colshard_pids(cluster: Any, host: str | None = None) -> dict[int, str]:
    """``pid -> label`` for every dict with a ``pid`` in the ``/v1/cluster`` answer whose
    ``host`` (when given) is this host."""
    host = host or socket.gethostname()
    found: dict[int, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            pid = node.get("pid")
            if isinstance(pid, int) and pid > 0 and node.get("host", host) == host:
                label = str(node.get("actor") or ("coordinator" if "roles" in node else path))
                found.setdefault(pid, label)
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(cluster, "")
    return found


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


class _Run:
    def __init__(self, cfg: LoadConfig, collection: str) -> None:
        self.cfg = cfg
        self.collection = collection
        self.latencies: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.written: set[str] = set()
        self.ids = [
            str(uuid.UUID(int=random.Random(cfg.seed + i).getrandbits(128), version=4))
            for i in range(cfg.id_pool)
        ]

    async def call(
        self, http: httpx.AsyncClient, op: str, method: str, path: str, **kwargs: Any
    ) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            response = await http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self._error(op, f"{op}: {type(exc).__name__}: {exc}")
            return None
        self.latencies.setdefault(op, []).append((time.perf_counter() - start) * 1000.0)
        if response.status_code >= 300:
            self._error(op, f"{op}: HTTP {response.status_code}: {response.text[:200]}")
            return None
        return response

    def _error(self, op: str, message: str) -> None:
        self.errors[op] = self.errors.get(op, 0) + 1
        if len(self.error_samples) < 20:
            self.error_samples.append(message)

    def objects(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        cfg = self.cfg
        out = []
        for oid in rng.choice(self.ids, size=cfg.batch_size, replace=False):
            n = int(rng.integers(cfg.min_tokens, cfg.max_tokens + 1))
            text = " ".join(rng.choice(WORDS, size=8))
            out.append(
                {
                    "id": str(oid),
                    "properties": {"text": text, "n": int(n)},
                    "vectors": {"mv": np.round(rng.standard_normal((n, cfg.dim)), 4).tolist()},
                }
            )
        return out

    async def client(self, index: int, http: httpx.AsyncClient, deadline: float) -> None:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed * 1000 + index)
        base = f"/v1/collections/{self.collection}"
        while time.monotonic() < deadline:
            roll = float(rng.random())
            if roll < cfg.write_fraction or not self.written:
                batch = self.objects(rng)
                response = await self.call(
                    http, "import", "POST", f"{base}/objects", json={"objects": batch}
                )
                if response is not None:
                    body = response.json()
                    if body.get("n_failed"):
                        self._error("import", f"import: {body['n_failed']} objects failed")
                    self.written.update(o["id"] for o in batch)
            elif roll < cfg.write_fraction + (1 - cfg.write_fraction) * 0.6:
                query = np.round(rng.standard_normal((cfg.query_tokens, cfg.dim)), 4).tolist()
                await self.call(
                    http,
                    "near_vector",
                    "POST",
                    f"{base}/query",
                    json={
                        "near_vector": {"vector": query},
                        "limit": cfg.limit,
                        "return_metadata": ["score"],
                    },
                )
            elif roll < cfg.write_fraction + (1 - cfg.write_fraction) * 0.8:
                await self.call(
                    http,
                    "bm25",
                    "POST",
                    f"{base}/query",
                    json={
                        "bm25": {"query": " ".join(rng.choice(WORDS, size=2))},
                        "limit": cfg.limit,
                    },
                )
            else:
                oid = str(rng.choice(sorted(self.written)))
                await self.call(http, "get", "GET", f"{base}/objects/{oid}")


async def _sample_memory(
    http: httpx.AsyncClient,
    cfg: LoadConfig,
    warm_at: float,
    stop: asyncio.Event,
    memory: dict[int, ProcessMemory],
) -> None:
    async def discover() -> None:
        pids = {pid: "gateway" for pid in cfg.gateway_pids}
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await http.get("/v1/cluster")
            if response.status_code == 200:
                pids.update(colshard_pids(response.json()))
        for pid, label in pids.items():
            memory.setdefault(pid, ProcessMemory(label, pid))

    await discover()
    last_discovery = time.monotonic()
    while True:
        now = time.monotonic()
        if now - last_discovery > 5.0:
            await discover()
            last_discovery = now
        for mem in memory.values():
            value = await asyncio.to_thread(rss_mb, mem.pid)
            if value is None:
                continue
            if mem.samples == 0:
                mem.start_mb = value
            if now <= warm_at or mem.warmup_mb == 0.0:
                mem.warmup_mb = value
            mem.end_mb = value
            mem.max_mb = max(mem.max_mb, value)
            mem.samples += 1
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), cfg.sample_every_s)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def run_load(cfg: LoadConfig) -> LoadReport:
    """Create a collection, drive it for ``cfg.duration_s``, drop it, report."""
    collection = f"Load_{uuid.uuid4().hex[:10]}"
    limits = httpx.Limits(max_connections=cfg.clients + 4, max_keepalive_connections=cfg.clients)
    async with httpx.AsyncClient(
        base_url=cfg.url,
        headers=_headers(cfg.api_key),
        timeout=cfg.request_timeout_s,
        limits=limits,
    ) as http:
        response = await http.post(
            "/v1/collections",
            json={
                "name": collection,
                "properties": [
                    {"name": "text", "data_type": "text"},
                    {"name": "n", "data_type": "int"},
                ],
                "vectors": [{"name": "mv", "dim": cfg.dim, "metric": "cosine"}],
                "shard_count": cfg.shard_count,
            },
        )
        if response.status_code != 201:
            raise RuntimeError(
                f"cannot create {collection}: HTTP {response.status_code} {response.text[:300]}"
            )
        run = _Run(cfg, collection)
        memory: dict[int, ProcessMemory] = {}
        stop = asyncio.Event()
        start = time.monotonic()
        deadline = start + cfg.duration_s
        sampler = asyncio.create_task(
            _sample_memory(http, cfg, start + min(cfg.warmup_s, cfg.duration_s), stop, memory)
        )
        try:
            await asyncio.gather(*(run.client(i, http, deadline) for i in range(cfg.clients)))
        finally:
            stop.set()
            await sampler
            elapsed = time.monotonic() - start
            if not cfg.keep_collection:
                with contextlib.suppress(httpx.HTTPError):
                    await http.delete(f"/v1/collections/{collection}")
    return _report(run, elapsed, memory.values())


def _report(run: _Run, elapsed: float, memory: Iterable[ProcessMemory]) -> LoadReport:
    ops = {}
    for op in set(run.latencies) | set(run.errors):
        values = run.latencies.get(op, [])
        ops[op] = OpStats(
            len(values) + run.errors.get(op, 0),
            run.errors.get(op, 0),
            round(_percentile(values, 50), 2),
            round(_percentile(values, 99), 2),
            round(max(values, default=0.0), 2),
        )
    everything = [v for values in run.latencies.values() for v in values]
    errors = sum(run.errors.values())
    total = len(everything) + errors
    return LoadReport(
        run.collection,
        round(elapsed, 2),
        total,
        errors,
        run.error_samples,
        round(total / elapsed, 2) if elapsed > 0 else 0.0,
        round(_percentile(everything, 50), 2),
        round(_percentile(everything, 99), 2),
        ops,
        sorted(memory, key=lambda m: (m.label, m.pid)),
        len(run.written),
    )
