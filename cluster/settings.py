"""Settings: built once at the entry point (CLI / tests) and passed down. Nothing read at import."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


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
    # Custom Ray resources every shard actor requests (e.g. {"colshard_shard": 1}): shards then
    # land only on nodes that advertise them, at most as many per node as it has units.
    shard_resources: Mapping[str, float] = field(default_factory=dict)
    # Membership: each Ray node's agent holds members/<node_id> under a lease of this TTL; the
    # coordinator reconciles agents and shard availability every membership_interval_s.
    member_ttl_s: int = 10
    # Encoder actors per vectorizer config (text2colbert-local loads its model in each): import
    # batches are spread over them in parallel, queries round-robin.
    vectorizer_replicas: int = 1
    membership_interval_s: float = 2.0


DATA_DIR_ENV = "COLSHARD_DATA_DIR"


def node_data_dir(default: Path | str) -> Path:
    """The data directory of the Ray node this process runs on: the node's own
    ``COLSHARD_DATA_DIR`` (set where ``ray start`` runs; workers inherit it), else ``default``
    (the coordinator's). Read when called, never at import."""
    return Path(os.environ.get(DATA_DIR_ENV) or default).resolve()
