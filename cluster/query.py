"""Typed query requests and results exchanged between the gateway and the coordinator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster.errors import InvalidInput
from cluster.types import F32

METADATA_FIELDS: tuple[str, ...] = ("score", "distance", "explain")
Fusion = Literal["ranked", "relative_score"]


@dataclass(frozen=True)
class Bm25Query:
    query: str
    properties: tuple[str, ...] | None = None


@dataclass(frozen=True)
class HybridQuery:
    query: str
    alpha: float = 0.75
    fusion: Fusion = "relative_score"
    vector: F32 | None = None  # a manual (multi-)vector instead of vectorizing ``query``
    properties: tuple[str, ...] | None = None  # keyword part's properties


@dataclass(frozen=True)
class QueryRequest:
    """Exactly one of near_vector / near_text / bm25 / hybrid is set (checked by the gateway and
    again by the coordinator)."""

    collection: str
    near_vector: F32 | None = None  # 1-D (single) or 2-D (multi) float32
    near_text: str | None = None
    bm25: Bm25Query | None = None
    hybrid: HybridQuery | None = None
    target_vector: str | None = None
    filters: Mapping[str, Any] | None = None  # wire form, parsed against the spec
    limit: int = 10
    offset: int = 0
    return_properties: tuple[str, ...] | None = None
    return_metadata: tuple[str, ...] = ()
    include_vector: bool = False
    partial: bool = False  # allow results from the shards that answered
    exact: bool = False  # vector part by exact MaxSim over every object (no token index)
    timeout_s: float | None = None  # the query's deadline; None: Settings.query_timeout_s
    api_keys: Mapping[str, str] = field(default_factory=dict)  # vectorizer keys from headers

    def kind(self) -> str:
        kinds = [
            name
            for name, value in (
                ("near_vector", self.near_vector),
                ("near_text", self.near_text),
                ("bm25", self.bm25),
                ("hybrid", self.hybrid),
            )
            if value is not None
        ]
        if len(kinds) != 1:
            raise InvalidInput(
                "set exactly one of near_vector, near_text, bm25, hybrid", {"given": kinds}
            )
        # Empty text would be vectorized to padding tokens only and rank arbitrary objects.
        text = (
            self.near_text
            if kinds[0] == "near_text"
            else self.hybrid.query
            if self.hybrid is not None and self.hybrid.vector is None
            else None
        )
        if text is not None and not text.strip():
            raise InvalidInput(f"{kinds[0]}: the query text is empty", {"field": kinds[0]})
        return kinds[0]


@dataclass(frozen=True)
class ResultObject:
    uuid: str
    properties: Mapping[str, Any]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    vectors: Mapping[str, F32] | None = None


@dataclass(frozen=True)
class QueryResult:
    objects: tuple[ResultObject, ...]
    missing_shards: tuple[int, ...] = ()
    took_s: float = 0.0
