"""Typed ids and routing: collection names, shard ids, actor names, jump consistent hash."""

from __future__ import annotations

import hashlib
import re
import uuid as uuid_mod
from dataclasses import dataclass

from cluster.errors import InvalidInput

COLLECTION_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
ACTOR_PREFIX = "colshard"


def validate_collection_name(name: str) -> str:
    if not isinstance(name, str) or not COLLECTION_NAME_RE.match(name):
        raise InvalidInput(
            f"invalid collection name {name!r}: must match {COLLECTION_NAME_RE.pattern}",
            {"name": name},
        )
    return name


def validate_field_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            f"invalid {kind} name {name!r}: must match {NAME_RE.pattern}", {kind: name}
        )
    return name


def normalize_uuid(value: str) -> str:
    """Canonical lower-case hyphenated form; InvalidInput if it is not a UUID."""
    try:
        return str(uuid_mod.UUID(str(value)))
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidInput(f"invalid uuid {value!r}", {"id": str(value)}) from exc


def new_uuid() -> str:
    return str(uuid_mod.uuid4())


@dataclass(frozen=True, order=True)
class ShardId:
    collection: str
    shard: int

    def __str__(self) -> str:
        return f"{self.collection}:{self.shard}"

    def actor_name(self, replica: int | None = None) -> str:
        """Name shown in `ray list actors` / the Ray dashboard."""
        base = f"{ACTOR_PREFIX}:{self.collection}:{self.shard}"
        return base if replica is None else f"{base}:{replica}"


COORDINATOR_ACTOR_NAME = f"{ACTOR_PREFIX}:coordinator"


def jump_hash(key: int, num_buckets: int) -> int:
    """Lamping & Veach jump consistent hash: moving from n to n+1 buckets moves 1/(n+1) keys."""
    if num_buckets <= 0:
        raise ValueError("num_buckets must be positive")
    b, j = -1, 0
    key &= 0xFFFFFFFFFFFFFFFF
    while j < num_buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


# Routing-hash versions (``CollectionSpec.routing``). A collection keeps the version it was
# created with for life: changing it would move existing objects to other shards.
# 1: the upper 64 bits of the UUID (ids that differ only in their lower half, e.g.
#    ``uuid.UUID(int=i)``, all land on one shard). Specs stored without a version are 1.
# 2: a BLAKE2b digest (8 bytes) of all 16 bytes of the id, so no structure in the id (halves
#    derived from each other, sequential integers, time-based uuid1) survives into the key.
#    New collections use it.
ROUTING_LEGACY = 1
ROUTING_LATEST = 2
ROUTING_VERSIONS = (ROUTING_LEGACY, ROUTING_LATEST)


def routing_key(object_id: str, routing: int) -> int:
    """The 64-bit jump-hash key of an object id under routing-hash version ``routing``."""
    value = uuid_mod.UUID(object_id)
    if routing == ROUTING_LEGACY:
        return value.int >> 64
    if routing == ROUTING_LATEST:
        return int.from_bytes(hashlib.blake2b(value.bytes, digest_size=8).digest(), "little")
    raise ValueError(f"unknown routing-hash version {routing!r}")


def shard_for_uuid(object_id: str, num_shards: int, routing: int = ROUTING_LATEST) -> int:
    """Deterministic routing of an object id to one of ``num_shards`` shards."""
    return jump_hash(routing_key(object_id, routing), num_shards)
