"""The HTTP wire schema (pydantic). The only place pydantic models exist; past the gateway,
requests travel as cluster dataclasses and numpy arrays."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

VECTOR_SCHEMA: dict[str, Any] = {
    "description": "A single vector (list of floats) or a multi-vector (list of lists of "
    "floats, shape (n_tokens, dim)); or either in binary form: "
    '{"base64": little-endian float32 values, row-major, base64-encoded; '
    '"shape": [dim] or [n_tokens, dim]} (half the bytes, faster to parse; '
    "the SDK sends this).",
    "anyOf": [
        {"type": "array", "items": {"type": "number"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["base64", "shape"],
            "properties": {
                "base64": {
                    "type": "string",
                    "format": "byte",
                    "description": "little-endian float32 values, row-major",
                },
                "shape": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0},
                    "minItems": 1,
                    "maxItems": 2,
                },
            },
        },
    ],
}
Vector = Annotated[Any, Field(json_schema_extra=VECTOR_SCHEMA)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PropertyModel(Strict):
    name: str
    data_type: Literal["text", "text[]", "int", "number", "boolean", "date", "uuid"]
    searchable: bool | None = None
    filterable: bool | None = None


class VectorizerModel(Strict):
    kind: Literal["none", "text2colbert-local", "text2colbert-jinaai"] = "none"
    source_properties: list[str] = []
    options: dict[str, Any] = {}


class IndexModel(Strict):
    kind: Literal["scann", "muvera", "flat"] = "scann"
    options: dict[str, Any] = {}


class CodecModel(Strict):
    kind: Literal["float32", "float16", "int8", "residual"]
    bits: Literal[2, 4] | None = Field(None, description="residual only; default 4")
    originals: bool | None = Field(
        None,
        description="int8/residual: also keep the vectors as written in a cold file (fetch, "
        "replication and merges read it; searches never do). Default true.",
    )


class PoolingModel(Strict):
    factor: int = Field(
        1, ge=1, le=16, description="keep ceil(n / factor) cluster means of an object's tokens"
    )
    min_tokens: int = Field(0, ge=0, description="objects with at most this many stay as is")


class NamedVectorModel(Strict):
    name: str
    kind: Literal["multi", "single"] = "multi"
    dim: int | None = Field(None, description="Required unless a vectorizer sets it.")
    metric: Literal["dot", "cosine"] = "cosine"
    dtype: Literal["float32", "float16"] | None = Field(
        None, description="Storage of recent writes (and of sealed ones with a float codec)."
    )
    codec: Literal["float32", "float16", "int8", "residual"] | CodecModel | None = Field(
        None,
        description="Storage of sealed segments' tokens: float32/float16 (default: the "
        "dtype), int8 (per-dimension scale) or residual (k-means centroid + 2/4-bit "
        "residual per dimension). Searches score the codes.",
    )
    pooling: PoolingModel | None = Field(
        None,
        description="Server-side token pooling at import (multi-vectors): each object's "
        "tokens clustered (Ward) and the cluster means stored.",
    )
    vectorizer: VectorizerModel | None = None
    index: IndexModel | None = None


class CollectionCreate(Strict):
    name: str = Field(description="^[A-Za-z][A-Za-z0-9_]{0,63}$")
    properties: list[PropertyModel] = []
    vectors: list[NamedVectorModel]
    shard_count: int = 2
    replication_factor: int = 1
    routing: int | None = Field(
        None,
        description="Routing-hash version (1: upper 64 id bits, legacy; 2: all 128 "
        "bits). Default: the latest. Fixed for the collection's life.",
    )

    def to_spec_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ObjectIn(Strict):
    id: str | None = None
    properties: dict[str, Any] = {}
    vectors: dict[str, Vector] = {}


class BatchIn(Strict):
    objects: list[ObjectIn]
    consistency_level: Literal["one", "quorum", "all"] | None = Field(
        None,
        description="Replicas that must apply the write before it is acknowledged: "
        "one, quorum (default: a majority), all. Also a query parameter.",
    )


class DeleteManyIn(Strict):
    filters: dict[str, Any]
    dry_run: bool = False
    consistency_level: Literal["one", "quorum", "all"] | None = Field(
        None,
        description="Replicas that must apply the write before it is acknowledged: "
        "one, quorum (default: a majority), all. Also a query parameter.",
    )


class BackupIn(Strict):
    id: str = Field(description="^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$; names the backup")
    collections: list[str] | None = Field(
        None, description="collections to back up (default: every collection)"
    )
    wait: bool = Field(
        True,
        description="true: answer 201 when the backup is written; false: answer 202 once it "
        "has started (GET /v1/backups/{id} shows its progress and end: done or failed)",
    )


class RestoreIn(Strict):
    collection: str = Field(description="the backed-up collection to restore")
    name: str | None = Field(
        None, description="restore under this name (default: its own, which must be free)"
    )


class MoveIn(Strict):
    to_node: str = Field(
        min_length=1,
        max_length=128,
        description="the Ray node id to move the replica to (GET /v1/cluster lists the members)",
    )
    replica: int = Field(0, ge=0, description="which replica of the shard (default 0)")


class DeleteManyOut(BaseModel):
    matched: int
    deleted: int
    dry_run: bool


class ObjectResult(BaseModel):
    id: str
    status: Literal["SUCCESS", "FAILED"]
    error: dict[str, Any] | None = None


class BatchOut(BaseModel):
    results: list[ObjectResult]
    n_ok: int
    n_failed: int


class ObjectOut(BaseModel):
    id: str
    collection: str
    properties: dict[str, Any]
    vectors: dict[str, Vector] | None = None
    vectors_lossy: list[str] | None = Field(
        None,
        description="Vectors returned decoded from a lossy codec that keeps no originals "
        "(not the values written).",
    )


class ObjectPage(BaseModel):
    objects: list[ObjectOut]
    next_after: str | None = None


class NearVectorIn(Strict):
    vector: Vector


class NearTextIn(Strict):
    query: str


class Bm25In(Strict):
    query: str
    properties: list[str] | None = None


class HybridIn(Strict):
    query: str
    alpha: float = Field(0.75, ge=0.0, le=1.0)
    fusion: Literal["ranked", "relative_score"] = "relative_score"
    vector: Vector | None = None
    properties: list[str] | None = None


class QueryIn(Strict):
    near_vector: NearVectorIn | None = None
    near_text: NearTextIn | None = None
    bm25: Bm25In | None = None
    hybrid: HybridIn | None = None
    target_vector: str | None = None
    filters: dict[str, Any] | None = None
    limit: int = 10
    offset: int = 0
    return_properties: list[str] | None = None
    return_metadata: list[Literal["score", "distance", "explain"]] = []
    include_vector: bool = False
    partial: bool = False
    exact: bool = Field(
        False,
        description="Answer the vector part by exact MaxSim over every object (no "
        "token index): for spot checks of what the index returns. Costs a "
        "scan of the collection; bounded by the query's timeout.",
    )
    allow_partial: bool = Field(
        False,
        description="Same as partial: when a shard fails or misses the deadline, "
        "return the other shards' results with partial: true and "
        "missing_shards, instead of 503/504.",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description="The query's deadline in seconds (default: the server's "
        "query timeout; at most max(that, 300)).",
    )


class ResultOut(BaseModel):
    id: str
    properties: dict[str, Any]
    metadata: dict[str, Any] = {}
    vectors: dict[str, Vector] | None = None


class QueryOut(BaseModel):
    objects: list[ResultOut]
    partial: bool = False
    missing_shards: list[int] = []
    took_ms: float


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorOut(BaseModel):
    error: ErrorDetail
