"""Settings: built once at the entry point (CLI / tests) and passed down. Nothing read at import.

``settings_from`` is where the server's settings meet the environment: the CLI calls it once,
at start, with its flags and ``os.environ`` (a flag given wins over its variable, a variable
over the default). ``ENVIRONMENT`` lists every variable colshard reads and where.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ShardSettings:
    """Tuning of one shard engine."""

    # Objects stay in the growing (exact, in-memory) segment until it holds this many tokens.
    seal_threshold_tokens: int = 65_536
    # Sealed segments with fewer tokens than this get no token index: they are scored exactly
    # (32 query tokens × 128 d: ~0.7 ms per 4k tokens, vs ~0.12 ms for a ScaNN probe).
    brute_force_max_tokens: int = 4_096
    # Compaction (shard.engine): the smallest sealed segments are merged once together they
    # reach merge_factor - 1/2 times the largest of them (≈ merge_factor similar segments), into
    # at most max_segment_tokens; below seal_threshold_tokens, and once the shard is idle,
    # already at 1.5 times. Every merge at least 1.5× the size of its inputs' largest: each token
    # is re-indexed O(log(max_segment_tokens / seal size)) times.
    merge_factor: int = 4
    max_segment_tokens: int = 4_194_304
    # No writes for this long = idle: the growing segment is sealed (and indexed) if it holds at
    # least brute_force_max_tokens tokens, and segments merge eagerly (above). 0: never idle.
    seal_idle_s: float = 3.0
    # Deferred indexing during write bursts: while the shard is not idle and has not been
    # searched for 30 s (shard.engine.DEFER_UNLESS_SEARCHED_S), sealed segments wait without a
    # token index (scored exactly, like the growing segment) until together they hold this
    # many tokens; then they are merged into one segment, which is indexed once. An idle shard
    # merges what waits (eagerly, above) and indexes the result. A bulk import then indexes
    # each token once below this size instead of once per merge tier. A search turns it off
    # (its queries would scan the waiting segments exactly). 0, or seal_idle_s 0 (no idle to
    # wait for): every sealed segment is indexed at once.
    index_defer_tokens: int = 1_048_576
    # Hits kept per query token (k') when generating candidates from the token index (shard-wide
    # top k', not per segment). Deep, because only rerank_docs of the candidates are re-scored.
    candidates_per_token: int = 512
    # Of the token index's candidate documents, only the best max(rerank_docs, 4·k) by their
    # approximate score (ANN hits, imputed similarity where a query token has no hit) are
    # re-scored with exact MaxSim; 0 re-scores every candidate (then k' ≈ 128 is enough).
    rerank_docs: int = 300
    # Of the documents in lossy-coded segments (a vector's int8 / residual codec) that keep
    # their originals, the best max(final_rerank_docs, 4·k) by their code scores (shard-wide)
    # are re-ranked by exact MaxSim on the originals (a cold file: these few documents are all
    # a query reads of it); 0: none, the code scores stand.
    final_rerank_docs: int = 40
    # Both are the values for a shard of up to 640k tokens / 20k objects (of the searched
    # vector); a larger shard uses value × (size / reference) ** candidates_scale_exponent
    # (shard.search.scaled_candidates). 0: no scaling.
    candidates_scale_exponent: float = 0.6
    # Recall calibration (shard.calibrate): queries per calibration sample (0: off, the depth
    # stays 1), and the share of one core a calibration may use (it sleeps between queries).
    calibration_queries: int = 128
    calibration_duty: float = 0.5
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
    # Request limits (cluster/limits.py: the gateway and the coordinator check them); 0 tokens
    # per object: no limit.
    max_tokens_per_object: int = 65_536
    max_query_tokens: int = 4_096
    max_dim: int = 65_536
    max_filter_depth: int = 16
    max_filter_nodes: int = 1_024
    max_shards: int = 256
    max_collections: int = 1_000
    # A collection's spec is one etcd value (etcd's default request limit: 1.5 MiB): these keep
    # it far below that (a property is ~100 bytes of JSON, a named vector ~300).
    max_properties: int = 1_024
    max_vectors: int = 64
    # Objects a vectorizer encodes for one write request (413 above it): bounds its run time
    # within the write timeout; its memory is bounded by encoding in chunks. 0: no limit.
    max_vectorize_objects: int = 2_000
    query_timeout_s: float = 30.0
    write_timeout_s: float = 120.0
    # HTTP connections (gateway/server.py): a request's headers must arrive within the header
    # timeout of its first byte (or of the connection opening), its body within the body
    # timeout of its headers; an idle keep-alive connection is closed after the idle timeout;
    # at most max_connections connections and requests at once (503 beyond).
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 120.0
    http_idle_timeout_s: float = 5.0
    max_connections: int = 1_024
    etcd_timeout_s: float = 5.0
    shard: ShardSettings = field(default_factory=ShardSettings)
    # Custom Ray resources that mark the nodes holding shards (e.g. {"colshard_shard": 1}):
    # shards land only there, each node taking as many replicas as it has units
    # (coordinator.placement counts them).
    shard_resources: Mapping[str, float] = field(default_factory=dict)
    # Shard host processes per node and replica index (shard s goes to host s % this): the
    # shards of one collection search in parallel processes. Fixed for a cluster's data.
    shard_hosts_per_node: int = 2
    # Rebalancing (coordinator.moves): every rebalance_interval_s, one replica moves from the
    # fullest shard node to the emptiest when they differ by two or more; 0 turns it off.
    rebalance_interval_s: float = 30.0
    # Membership: each Ray node's agent holds members/<node_id> under a lease of this TTL; the
    # coordinator reconciles agents and shard availability every membership_interval_s.
    member_ttl_s: int = 10
    # Encoder actors per vectorizer config (text2colbert-local loads its model in each): import
    # batches are spread over them in parallel, queries round-robin.
    vectorizer_replicas: int = 1
    membership_interval_s: float = 2.0
    # Where backups are written and restored from (coordinator.backups); None: <data_dir>/backups.
    # On several nodes it must be storage every node mounts at the same path, or S3:
    # backup_url ("s3://bucket/prefix", set by --backup-dir s3://...) wins over it.
    backup_dir: Path | None = None
    backup_url: str | None = None
    # How long one shard may take to copy its staged backup into the backup directory (or a
    # restore to copy it back): no write waits meanwhile, so this is not write_timeout_s.
    backup_timeout_s: float = 3600.0

    @property
    def backup_root(self) -> Path:
        return Path(self.backup_dir) if self.backup_dir is not None else self.data_dir / "backups"

    @property
    def backup_target(self) -> Path | str:
        """The s3:// URL backups go to, else their directory."""
        return self.backup_url or self.backup_root


DATA_DIR_ENV = "COLSHARD_DATA_DIR"


def node_data_dir(default: Path | str) -> Path:
    """The data directory of the Ray node this process runs on: the node's own
    ``COLSHARD_DATA_DIR`` (set where ``ray start`` runs; workers inherit it), else ``default``
    (the coordinator's). Read when called, never at import."""
    return Path(os.environ.get(DATA_DIR_ENV) or default).resolve()


# Every environment variable colshard reads, and where. The server's own are read once, by
# ``settings_from`` (the CLI, at start); the others where their process starts.
ENVIRONMENT: Mapping[str, str] = {
    "COLSHARD_ETCD": "etcd endpoints, comma-separated (settings_from; else the embedded etcd)",
    "COLSHARD_DATA_DIR": "data directory (settings_from; on a worker node: node_data_dir)",
    "COLSHARD_CLUSTER_NAME": "cluster name: etcd prefix and Ray namespace (settings_from)",
    "COLSHARD_RAY_ADDRESS": "Ray cluster to join (settings_from)",
    "COLSHARD_SHARD_RESOURCES": "Ray resources each shard actor asks for (settings_from)",
    "COLSHARD_VECTORIZER_REPLICAS": "encoder actors per vectorizer config (settings_from)",
    "COLSHARD_SHARD_HOSTS_PER_NODE": "shard host processes per node and replica index "
    "(settings_from)",
    "COLSHARD_REBALANCE_INTERVAL_S": "seconds between rebalancing moves, 0 = off (settings_from)",
    "COLSHARD_SEAL_THRESHOLD_TOKENS": "ShardSettings.seal_threshold_tokens (settings_from)",
    "COLSHARD_INDEX_DEFER_TOKENS": "ShardSettings.index_defer_tokens (settings_from)",
    "COLSHARD_CALIBRATION_QUERIES": "ShardSettings.calibration_queries (settings_from)",
    "COLSHARD_BACKUP_DIR": "where backups are written and restored from (settings_from)",
    "COLSHARD_BACKUP_TIMEOUT_S": "Settings.backup_timeout_s: one shard's backup copy or "
    "restore (settings_from)",
    "COLSHARD_SEPARATE_GATEWAY": "serve: run the gateway in its own process (CLI)",
    "COLSHARD_URL": "the CLI's and the SDK's server URL (CLI)",
    "COLSHARD_API_KEY": "the CLI's and the SDK's API key (CLI, gateway.client)",
    "COLSHARD_API_KEYS": "API keys the gateway accepts (gateway.auth, at start)",
    "COLSHARD_API_KEYS_FILE": "the gateway's keys file (gateway.auth, at start)",
    "COLSHARD_FAST_PATH": "0: no same-node shard calls over a local socket (cluster.localrpc)",
    "COLSHARD_FAULT_READ_DELAY_S": "tests only: shard reads sleep this long (shard.actor)",
    "JINAAI_APIKEY": "the Jina vectorizer's key when a request brings none",
}


def _int_at_least(name: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


def _positive_seconds(name: str, value: object) -> float:
    try:
        seconds = float(str(value))
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def parse_resources(text: str) -> dict[str, float]:
    """``--shard-resources`` / COLSHARD_SHARD_RESOURCES: a JSON object of Ray resource
    amounts, e.g. ``{"colshard_shard": 1}``; empty: none. ValueError otherwise."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("not an object")
        return {str(k): float(v) for k, v in value.items()}
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"--shard-resources must be a JSON object of numbers ({exc}): {text!r}"
        ) from exc


def _seconds_or_off(name: str, value: Any) -> float:
    """A number of seconds ≥ 0 (0: off)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds (0: off), got {value!r}") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{name} must be a number of seconds ≥ 0 (0: off), got {value!r}")
    return seconds


def settings_from(
    flags: Mapping[str, Any], environ: Mapping[str, str], limit_fields: tuple[str, ...] = ()
) -> Settings:
    """The settings of ``colshard serve`` / ``gateway``: each flag that was given (not None),
    else its environment variable (``ENVIRONMENT``), else the default. ``limit_fields`` are
    Settings fields taken from the flag of the same name. ValueError for a bad value."""

    def pick(flag: str, env: str) -> Any:
        given = flags.get(flag)
        return given if given not in (None, "") else environ.get(env) or None

    etcd = str(pick("etcd", "COLSHARD_ETCD") or "")
    shard = ShardSettings()
    seal = pick("seal_threshold_tokens", "COLSHARD_SEAL_THRESHOLD_TOKENS")
    if seal is not None:
        seal = _int_at_least("seal_threshold_tokens", str(seal), 1)
        shard = replace(shard, seal_threshold_tokens=seal)
    defer = pick("index_defer_tokens", "COLSHARD_INDEX_DEFER_TOKENS")
    if defer is not None:
        shard = replace(
            shard, index_defer_tokens=_int_at_least("index_defer_tokens", str(defer), 0)
        )
    calibration = pick("calibration_queries", "COLSHARD_CALIBRATION_QUERIES")
    if calibration is not None:
        queries = _int_at_least("calibration_queries", str(calibration), 0)
        shard = replace(shard, calibration_queries=queries)
    replicas = pick("vectorizer_replicas", "COLSHARD_VECTORIZER_REPLICAS")
    hosts = pick("shard_hosts_per_node", "COLSHARD_SHARD_HOSTS_PER_NODE")
    rebalance = pick("rebalance_interval_s", "COLSHARD_REBALANCE_INTERVAL_S")
    backup_dir = pick("backup_dir", "COLSHARD_BACKUP_DIR")
    backup_timeout = pick("backup_timeout_s", "COLSHARD_BACKUP_TIMEOUT_S")
    return Settings(
        data_dir=Path(pick("data_dir", "COLSHARD_DATA_DIR") or "./colshard-data").resolve(),
        cluster_name=str(pick("cluster_name", "COLSHARD_CLUSTER_NAME") or "default"),
        etcd_endpoints=tuple(e.strip() for e in etcd.split(",") if e.strip()),
        ray_address=pick("ray_address", "COLSHARD_RAY_ADDRESS"),
        host=flags.get("host", Settings.host),
        port=flags.get("port", Settings.port),
        max_body_bytes=int(flags.get("max_body_mb", 64)) * 1024 * 1024,
        **{name: flags[name] for name in limit_fields if flags.get(name) is not None},
        shard_resources=parse_resources(
            str(pick("shard_resources", "COLSHARD_SHARD_RESOURCES") or "")
        ),
        vectorizer_replicas=_int_at_least("vectorizer_replicas", str(replicas or 1), 1),
        shard_hosts_per_node=_int_at_least(
            "shard_hosts_per_node", str(hosts or Settings.shard_hosts_per_node), 1
        ),
        rebalance_interval_s=_seconds_or_off("rebalance_interval_s", rebalance)
        if rebalance is not None
        else Settings.rebalance_interval_s,
        shard=shard,
        backup_dir=Path(backup_dir).resolve()
        if backup_dir and not str(backup_dir).startswith("s3://")
        else None,
        backup_url=str(backup_dir) if str(backup_dir or "").startswith("s3://") else None,
        backup_timeout_s=_positive_seconds("backup_timeout_s", backup_timeout)
        if backup_timeout is not None
        else Settings.backup_timeout_s,
    )
