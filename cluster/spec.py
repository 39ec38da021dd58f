"""Declared configuration of a collection (``*Spec``): validated once, immutable, JSON in etcd.

Wire/etcd form of a collection::

    {"name": "DemoCollection",
     "properties": [{"name": "text", "data_type": "text", "searchable": true, "filterable": true}],
     "vectors": [{"name": "multi_vector", "kind": "multi", "dim": 128, "metric": "cosine",
                  "dtype": "float32", "codec": {"kind": "float32"},
                  "vectorizer": {"kind": "none", "source_properties": [], "options": {}},
                  "index": {"kind": "scann", "options": {}}}],
     "shard_count": 2, "replication_factor": 1, "routing": 2}

``routing`` is the routing-hash version (``cluster.ids``): new collections get the latest; a
stored spec without it predates versions and keeps version 1, so its objects stay where they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from cluster.errors import InvalidInput, NotFound
from cluster.ids import (
    ROUTING_LATEST,
    ROUTING_LEGACY,
    ROUTING_VERSIONS,
    shard_for_uuid,
    validate_collection_name,
    validate_field_name,
)
from cluster.recall import RECALL_KS, TARGET_RECALL_RANGE

DataType = Literal["text", "text[]", "int", "number", "boolean", "date", "uuid"]
DATA_TYPES: tuple[str, ...] = ("text", "text[]", "int", "number", "boolean", "date", "uuid")
Metric = Literal["dot", "cosine"]
VectorKind = Literal["multi", "single"]
StorageDtype = Literal["float32", "float16"]
CodecKind = Literal["float32", "float16", "int8", "residual"]
CODEC_KINDS: tuple[str, ...] = ("float32", "float16", "int8", "residual")
RESIDUAL_BITS: tuple[int, ...] = (2, 4)
DEFAULT_RESIDUAL_BITS = 4
VECTORIZERS: tuple[str, ...] = ("none", "text2colbert-local", "text2colbert-jinaai")
INDEX_KINDS: tuple[str, ...] = ("scann", "muvera", "flat")
# ``muvera`` index options (shard.muvera): default and inclusive integer range of each. The
# defaults were measured on the benchmark's small synthetic set (docs/bench.md, "MUVERA").
MUVERA_DEFAULTS: Mapping[str, Any] = {
    "repetitions": 20,
    "k_sim": 2,
    "d_proj": 16,
    "fill_empty_partitions": True,
    "seed": 0,
    "candidates": 500,
}
MUVERA_RANGES: Mapping[str, tuple[int, int]] = {
    "repetitions": (1, 64),
    "k_sim": (0, 10),
    "d_proj": (0, 4096),
    "seed": (0, 2**32 - 1),
    "candidates": (1, 100_000),
}
# Upper bound on the FDE dimension repetitions·2^k_sim·(d_proj or dim): 2 bytes per dimension
# per document are stored and scanned per query.
MUVERA_MAX_FDE_DIM = 65_536
MAX_DIM = 65536
MAX_SHARDS = 256


def _require(cond: bool, message: str, **details: Any) -> None:
    if not cond:
        raise InvalidInput(message, details)


def _int_in(value: Any, lo: int, hi: int) -> bool:
    """Whether ``value`` is an integer (not a bool) in ``lo..hi``."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_keys(kind: str, raw: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(raw) - allowed
    _require(not unknown, f"unknown field(s) in {kind}: {sorted(unknown)}", fields=sorted(unknown))


@dataclass(frozen=True)
class PropertySpec:
    name: str
    data_type: DataType
    searchable: bool = True  # BM25; only meaningful for text / text[]
    filterable: bool = True

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PropertySpec:
        _require(isinstance(raw, Mapping), "a property must be an object")
        _check_keys("property", raw, {"name", "data_type", "searchable", "filterable"})
        name = validate_field_name("property", raw.get("name", ""))
        data_type = raw.get("data_type")
        _require(
            data_type in DATA_TYPES,
            f"property {name!r}: data_type must be one of {list(DATA_TYPES)}",
            property=name,
        )
        searchable = raw.get("searchable", data_type in ("text", "text[]"))
        filterable = raw.get("filterable", True)
        _require(
            isinstance(searchable, bool) and isinstance(filterable, bool),
            f"property {name!r}: searchable/filterable must be booleans",
            property=name,
        )
        return cls(name, cast(DataType, data_type), bool(searchable), bool(filterable))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data_type": self.data_type,
            "searchable": self.searchable,
            "filterable": self.filterable,
        }


@dataclass(frozen=True)
class VectorizerSpec:
    kind: str = "none"
    source_properties: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> VectorizerSpec:
        if raw is None:
            return cls()
        _require(isinstance(raw, Mapping), "vectorizer must be an object")
        _check_keys("vectorizer", raw, {"kind", "source_properties", "options"})
        kind = raw.get("kind", "none")
        _require(
            kind in VECTORIZERS, f"vectorizer kind must be one of {list(VECTORIZERS)}", kind=kind
        )
        sources = raw.get("source_properties", [])
        _require(
            isinstance(sources, list) and all(isinstance(s, str) for s in sources),
            "vectorizer.source_properties must be a list of property names",
        )
        options = raw.get("options", {})
        _require(isinstance(options, Mapping), "vectorizer.options must be an object")
        return cls(str(kind), tuple(sources), dict(options))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source_properties": list(self.source_properties),
            "options": dict(self.options),
        }


@dataclass(frozen=True)
class IndexSpec:
    kind: str = "scann"
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> IndexSpec:
        if raw is None:
            return cls()
        _require(isinstance(raw, Mapping), "index must be an object")
        _check_keys("index", raw, {"kind", "options"})
        kind = raw.get("kind", "scann")
        _require(kind in INDEX_KINDS, f"index kind must be one of {list(INDEX_KINDS)}", kind=kind)
        options = raw.get("options", {})
        _require(isinstance(options, Mapping), "index.options must be an object")
        _check_recall_options(options, str(kind))
        if kind == "muvera":
            _check_muvera_options({k: v for k, v in options.items() if k not in RECALL_OPTIONS})
        return cls(str(kind), dict(options))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "options": dict(self.options)}


# Recall target of an approximate index (shard.calibrate): recall@recall_k the shard's search
# must reach against exact MaxSim, measured and met by its calibration.
RECALL_OPTIONS: tuple[str, ...] = ("target_recall", "recall_k")


def _check_recall_options(options: Mapping[str, Any], kind: str) -> None:
    if "target_recall" in options:
        value = options["target_recall"]
        lo, hi = TARGET_RECALL_RANGE
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi,
            f"index option target_recall must be a number in {lo}..{hi}",
            option="target_recall",
        )
    if "recall_k" in options:
        _require(
            options["recall_k"] in RECALL_KS and not isinstance(options["recall_k"], bool),
            f"index option recall_k must be one of {list(RECALL_KS)}",
            option="recall_k",
        )
    if kind == "flat":
        present = sorted(set(options) & set(RECALL_OPTIONS))
        _require(not present, f"a flat index is exact: {present} do not apply", options=present)


def _check_muvera_options(options: Mapping[str, Any]) -> None:
    allowed = set(MUVERA_DEFAULTS)
    unknown = sorted(set(options) - allowed)
    _require(
        not unknown,
        f"unknown muvera index option(s) {unknown}; known: {sorted(allowed)}",
        options=unknown,
    )
    for name, value in options.items():
        if name == "fill_empty_partitions":
            _require(
                isinstance(value, bool),
                "muvera index option fill_empty_partitions must be a boolean",
                option=name,
            )
            continue
        lo, hi = MUVERA_RANGES[name]
        _require(
            _int_in(value, lo, hi),
            f"muvera index option {name} must be an integer in {lo}..{hi}",
            option=name,
        )


def muvera_fde_dim(options: Mapping[str, Any], dim: int) -> int:
    """The FDE dimension of a muvera vector: repetitions·2^k_sim·(d_proj, or dim if 0)."""
    opts = {**MUVERA_DEFAULTS, **options}
    width = int(opts["d_proj"]) or dim
    return int(opts["repetitions"]) * (1 << int(opts["k_sim"])) * width


@dataclass(frozen=True)
class CodecSpec:
    """How a named vector's tokens are stored in sealed segments (shard.tokencodec).

    ``float32`` / ``float16``: as they are, in the vector's ``dtype``; ``int8``: one byte per
    dimension with a per-dimension scale; ``residual``: the nearest of the segment's k-means
    centroids plus a ``bits``-bit (2 or 4) quantised residual per dimension (ColBERTv2-style).
    int8 and residual are lossy: searches score the codes. With ``originals`` (the default) the
    vectors as written are also kept, in a cold file that queries never read: fetch,
    replication catch-up, backups and re-encoding use them, so nothing is lost; without, fetch
    returns the decoded values (marked ``vectors_lossy``). Recent writes (the WAL and the
    growing segment) keep ``dtype``."""

    kind: CodecKind = "float32"
    bits: int = 0  # residual only
    originals: bool = True  # lossy codecs only

    @property
    def lossy(self) -> bool:
        return self.kind in ("int8", "residual")

    @classmethod
    def from_raw(cls, raw: Any, vector: str, dtype: str | None) -> CodecSpec:
        """``raw``: absent (the ``dtype``), a kind name, or ``{"kind", "bits"}``."""
        if raw is None:
            return cls(cast(CodecKind, dtype or "float32"))
        if isinstance(raw, str):
            raw = {"kind": raw}
        _require(
            isinstance(raw, Mapping),
            f"vector {vector!r}: codec must be a kind name or an object",
            vector=vector,
        )
        _check_keys("codec", raw, {"kind", "bits", "originals"})
        kind = raw.get("kind")
        _require(
            kind in CODEC_KINDS,
            f"vector {vector!r}: codec kind must be one of {list(CODEC_KINDS)}",
            vector=vector,
            kind=kind,
        )
        if kind in ("float32", "float16"):
            _require(
                dtype is None or dtype == kind,
                f"vector {vector!r}: codec {kind} conflicts with dtype {dtype}",
                vector=vector,
            )
        bits = raw.get("bits")
        if kind == "residual":
            bits = DEFAULT_RESIDUAL_BITS if bits is None else bits
            _require(
                bits in RESIDUAL_BITS and not isinstance(bits, bool),
                f"vector {vector!r}: residual codec bits must be one of {list(RESIDUAL_BITS)}",
                vector=vector,
                bits=bits,
            )
        else:
            _require(
                bits is None,
                f"vector {vector!r}: bits applies to the residual codec only",
                vector=vector,
            )
        originals = raw.get("originals", True)
        _require(
            isinstance(originals, bool),
            f"vector {vector!r}: codec originals must be true or false",
            vector=vector,
        )
        return cls(cast(CodecKind, kind), int(bits or 0), originals)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "residual":
            out["bits"] = self.bits
        if self.lossy:
            out["originals"] = self.originals
        return out


MAX_POOL_FACTOR = 16
MAX_POOL_MIN_TOKENS = 1_000_000


@dataclass(frozen=True)
class PoolingSpec:
    """Server-side token pooling of a multi-vector (``cluster.pooling``): each object's tokens
    are clustered at import and ``ceil(n / factor)`` cluster means stored; objects with at most
    ``min_tokens`` tokens are stored as they are. ``factor`` 1: off."""

    factor: int = 1
    min_tokens: int = 0

    @classmethod
    def from_raw(cls, raw: Any, vector: str, multi: bool) -> PoolingSpec:
        if raw is None:
            return cls()
        _require(isinstance(raw, Mapping), f"vector {vector!r}: pooling must be an object")
        _check_keys("pooling", raw, {"factor", "min_tokens"})
        factor = raw.get("factor", 1)
        _require(
            _int_in(factor, 1, MAX_POOL_FACTOR),
            f"vector {vector!r}: pooling factor must be an integer in 1..{MAX_POOL_FACTOR}",
            vector=vector,
        )
        min_tokens = raw.get("min_tokens", 0)
        _require(
            _int_in(min_tokens, 0, MAX_POOL_MIN_TOKENS),
            f"vector {vector!r}: pooling min_tokens must be an integer in 0..{MAX_POOL_MIN_TOKENS}",
            vector=vector,
        )
        _require(
            multi or factor == 1,
            f"vector {vector!r}: pooling applies to multi-vectors only",
            vector=vector,
        )
        return cls(int(factor), int(min_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "min_tokens": self.min_tokens}


@dataclass(frozen=True)
class NamedVectorSpec:
    """One named vector. ``multi`` vectors are (n_tokens, dim) matrices scored with MaxSim;
    ``single`` vectors are stored as a 1-row matrix, so MaxSim reduces to the plain dot."""

    name: str
    kind: VectorKind
    dim: int
    metric: Metric = "cosine"
    dtype: StorageDtype = "float32"
    vectorizer: VectorizerSpec = field(default_factory=VectorizerSpec)
    index: IndexSpec = field(default_factory=IndexSpec)
    codec: CodecSpec = field(default_factory=CodecSpec)
    pooling: PoolingSpec = field(default_factory=PoolingSpec)

    def __post_init__(self) -> None:
        if self.codec.kind in ("float32", "float16") and self.codec.kind != self.dtype:
            object.__setattr__(self, "codec", CodecSpec(self.dtype))

    @property
    def multi(self) -> bool:
        return self.kind == "multi"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NamedVectorSpec:
        _require(isinstance(raw, Mapping), "a named vector must be an object")
        _check_keys(
            "vector",
            raw,
            {"name", "kind", "dim", "metric", "dtype", "codec", "pooling", "vectorizer", "index"},
        )
        name = validate_field_name("vector", raw.get("name", ""))
        kind = raw.get("kind", "multi")
        _require(
            kind in ("multi", "single"),
            f"vector {name!r}: kind must be multi or single",
            vector=name,
        )
        vectorizer = VectorizerSpec.from_dict(raw.get("vectorizer"))
        dim = raw.get("dim")
        if dim is None and vectorizer.kind != "none":
            dim = 0  # filled in by the vectorizer's model when the collection is created
        _require(
            isinstance(dim, int)
            and not isinstance(dim, bool)
            and 0 <= dim <= MAX_DIM
            and (dim > 0 or vectorizer.kind != "none"),
            f"vector {name!r}: dim must be an integer in 1..{MAX_DIM}",
            vector=name,
        )
        metric = raw.get("metric", "cosine")
        _require(
            metric in ("dot", "cosine"),
            f"vector {name!r}: metric must be dot or cosine",
            vector=name,
        )
        given_dtype = raw.get("dtype")
        _require(
            given_dtype in (None, "float32", "float16"),
            f"vector {name!r}: dtype must be float32 or float16",
            vector=name,
        )
        codec = CodecSpec.from_raw(raw.get("codec"), name, given_dtype)
        # a float16 codec stores float16 throughout; a lossy codec's recent writes keep dtype
        dtype = given_dtype or ("float16" if codec.kind == "float16" else "float32")
        index = IndexSpec.from_dict(raw.get("index"))
        if index.kind == "muvera":
            fde_dim = muvera_fde_dim(index.options, int(cast(int, dim)))
            _require(
                fde_dim <= MUVERA_MAX_FDE_DIM,
                f"vector {name!r}: muvera FDE dimension repetitions·2^k_sim·(d_proj or "
                f"dim) = {fde_dim} exceeds {MUVERA_MAX_FDE_DIM}",
                vector=name,
                fde_dim=fde_dim,
            )
        return cls(
            name,
            cast(VectorKind, kind),
            int(cast(int, dim)),
            cast(Metric, metric),
            cast(StorageDtype, dtype),
            vectorizer,
            index,
            codec,
            PoolingSpec.from_raw(raw.get("pooling"), name, kind == "multi"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "dim": self.dim,
            "metric": self.metric,
            "dtype": self.dtype,
            "codec": self.codec.to_dict(),
            "pooling": self.pooling.to_dict(),
            "vectorizer": self.vectorizer.to_dict(),
            "index": self.index.to_dict(),
        }


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    properties: tuple[PropertySpec, ...]
    vectors: tuple[NamedVectorSpec, ...]
    shard_count: int = 2
    replication_factor: int = 1
    routing: int = ROUTING_LATEST

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CollectionSpec:
        _require(isinstance(raw, Mapping), "a collection must be an object")
        _check_keys(
            "collection",
            raw,
            {"name", "properties", "vectors", "shard_count", "replication_factor", "routing"},
        )
        name = validate_collection_name(raw.get("name", ""))
        props_raw = raw.get("properties", [])
        vecs_raw = raw.get("vectors", [])
        _require(isinstance(props_raw, list), "properties must be a list")
        _require(isinstance(vecs_raw, list), "vectors must be a list")
        props = tuple(PropertySpec.from_dict(p) for p in props_raw)
        vecs = tuple(NamedVectorSpec.from_dict(v) for v in vecs_raw)
        _require(len(vecs) >= 1, "a collection needs at least one named vector")
        for kind, names in (
            ("property", [p.name for p in props]),
            ("vector", [v.name for v in vecs]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            _require(not dupes, f"duplicate {kind} name(s): {dupes}", names=dupes)
        shard_count = raw.get("shard_count", 2)
        _require(
            _int_in(shard_count, 1, MAX_SHARDS),
            f"shard_count must be an integer in 1..{MAX_SHARDS}",
        )
        rf = raw.get("replication_factor", 1)
        _require(
            _int_in(rf, 1, 3),
            "replication_factor must be an integer in 1..3",
        )
        routing = raw.get("routing", ROUTING_LATEST)
        _require(
            isinstance(routing, int)
            and not isinstance(routing, bool)
            and routing in ROUTING_VERSIONS,
            f"routing must be one of {list(ROUTING_VERSIONS)}",
            routing=routing,
        )
        prop_names = {p.name for p in props}
        for v in vecs:
            missing = [s for s in v.vectorizer.source_properties if s not in prop_names]
            _require(
                not missing,
                f"vector {v.name!r}: unknown source properties {missing}",
                vector=v.name,
                properties=missing,
            )
        return cls(name, props, vecs, int(shard_count), int(rf), int(routing))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "properties": [p.to_dict() for p in self.properties],
            "vectors": [v.to_dict() for v in self.vectors],
            "shard_count": self.shard_count,
            "replication_factor": self.replication_factor,
            "routing": self.routing,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CollectionSpec:
        """A stored spec. One written before routing versions existed was routed with 1."""
        raw = json.loads(text)
        if isinstance(raw, dict):
            raw.setdefault("routing", ROUTING_LEGACY)
        return cls.from_dict(raw)

    def shard_for(self, object_id: str) -> int:
        """The shard that holds ``object_id`` (a canonical UUID string)."""
        return shard_for_uuid(object_id, self.shard_count, self.routing)

    def vector(self, name: str | None) -> NamedVectorSpec:
        """The named vector; ``None`` picks the only one (error if there are several)."""
        if name is None:
            if len(self.vectors) == 1:
                return self.vectors[0]
            raise InvalidInput(
                f"collection {self.name!r} has several named vectors; set target_vector",
                {"vectors": [v.name for v in self.vectors]},
            )
        for v in self.vectors:
            if v.name == name:
                return v
        raise NotFound(
            f"collection {self.name!r} has no named vector {name!r}",
            {"collection": self.name, "vector": name},
        )

    def property(self, name: str) -> PropertySpec:
        for p in self.properties:
            if p.name == name:
                return p
        raise NotFound(
            f"collection {self.name!r} has no property {name!r}",
            {"collection": self.name, "property": name},
        )
