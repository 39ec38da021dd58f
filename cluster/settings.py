"""Settings: built once at the entry point (CLI / tests) and passed down. Nothing read at import."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ShardSettings:
    """Tuning of one shard engine."""

    # Objects stay in the growing (exact, in-memory) segment until it holds this many tokens.
    seal_threshold_tokens: int = 65_536
    # Segments with fewer tokens than this are searched with ScaNN brute force.
    brute_force_max_tokens: int = 20_000
    # Hits kept per query token (k') when generating candidates from the token index.
    candidates_per_token: int = 128
    fsync: bool = True


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./colshard-data")
    cluster_name: str = "default"
    etcd_endpoints: tuple[str, ...] = ()  # empty: start an embedded etcd on 127.0.0.1
    ray_address: str | None = None  # None: start a local Ray
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024 * 1024
    max_batch_objects: int = 10_000
    max_limit: int = 10_000
    query_timeout_s: float = 30.0
    write_timeout_s: float = 120.0
    etcd_timeout_s: float = 5.0
    shard: ShardSettings = field(default_factory=ShardSettings)
