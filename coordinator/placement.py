"""Shard placement: the one module that creates (and kills) ShardActor processes.

Actors are named ``colshard:<collection>:<shard>`` (``:<replica>`` appended when the collection
has more than one replica), live in the Ray namespace of the colshard cluster, are detached (they
outlive the process that created them; the coordinator re-attaches by name) and restart on
failure (``max_restarts``), recovering their data from the shard's directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import ray

from cluster.ids import ACTOR_PREFIX, ShardId
from cluster.settings import ShardSettings
from cluster.spec import CollectionSpec, VectorizerSpec
from coordinator.fanout import RayShardClient, RayVectorizerClient, ShardClient
from coordinator.vectorize import vectorizer_key
from coordinator.vectorizers.actor import VectorizerActor
from shard.actor import ShardActor

SHARD_MAX_RESTARTS = 5
SHARD_MAX_CONCURRENCY = 8


def actor_name(spec: CollectionSpec, shard: int, replica: int) -> str:
    sid = ShardId(spec.name, shard)
    return sid.actor_name(replica if spec.replication_factor > 1 else None)


def shard_data_dir(data_dir: Path, spec: CollectionSpec, shard: int, replica: int) -> Path:
    base = data_dir / spec.name / str(shard)
    return base if spec.replication_factor == 1 else base.with_name(f"{shard}-r{replica}")


class RayPlacement:
    """Creates shard actors in ``namespace``; ``resources`` can pin them to labelled nodes."""

    def __init__(
        self,
        namespace: str,
        data_dir: Path,
        shard_settings: ShardSettings,
        resources: dict[str, float] | None = None,
        vectorizer_replicas: int = 1,
    ) -> None:
        self._namespace = namespace
        self._vectorizer_replicas = max(1, vectorizer_replicas)
        self._data_dir = data_dir
        self._settings = shard_settings
        self._resources = dict(resources or {})
        self._remote_cls: Any = ray.remote(ShardActor)
        self._vectorizer_cls: Any = ray.remote(VectorizerActor)

    def open_shard(self, spec: CollectionSpec, shard: int, replica: int) -> ShardClient:
        """Get the shard's actor by name, creating it when absent."""
        name = actor_name(spec, shard, replica)
        # Relative to the data dir of the node the actor lands on (its COLSHARD_DATA_DIR, else
        # the coordinator's data dir): each shard keeps its data on its own node.
        subdir = shard_data_dir(Path(), spec, shard, replica).as_posix()
        handle = self._remote_cls.options(
            name=name,
            namespace=self._namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            resources=self._resources or None,
            max_restarts=SHARD_MAX_RESTARTS,
            max_concurrency=SHARD_MAX_CONCURRENCY,
            # SPREAD puts a collection's shards on different nodes of a multi-node cluster;
            # resources (Settings.shard_resources, e.g. {"colshard_shard": 1}) keep them on the
            # nodes that advertise them, and cap how many each node takes.
            scheduling_strategy="SPREAD",
        ).remote(spec.to_json(), shard, str(self._data_dir), self._settings, subdir)
        return RayShardClient(handle, ShardId(spec.name, shard))

    def kill_shard(self, spec: CollectionSpec, shard: int, replica: int) -> None:
        try:
            handle = ray.get_actor(actor_name(spec, shard, replica), namespace=self._namespace)
        except ValueError:
            return  # not running
        ray.kill(handle, no_restart=True)

    def open_vectorizer(self, spec: VectorizerSpec) -> RayVectorizerClient:
        """A pool of encoder actors per distinct vectorizer config, shared by every collection:
        ``colshard:vectorizer:<digest>`` (and ``...:<i>`` for i >= 1), spread over nodes."""
        digest = hashlib.sha1(vectorizer_key(spec).encode()).hexdigest()[:12]
        name = f"{ACTOR_PREFIX}:vectorizer:{digest}"
        handles = [
            self._vectorizer_cls.options(
                name=name if i == 0 else f"{name}:{i}",
                namespace=self._namespace,
                get_if_exists=True,
                lifetime="detached",
                num_cpus=0,
                max_restarts=SHARD_MAX_RESTARTS,
                max_concurrency=2,
                scheduling_strategy="SPREAD",
            ).remote(spec.kind, dict(spec.options))
            for i in range(self._vectorizer_replicas)
        ]
        return RayVectorizerClient(handles, name)
