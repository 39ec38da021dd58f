"""The coordinator's logic without a cluster: an in-memory store and in-process shard engines
behind the same ShardClient interface the Ray actors implement."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import AlreadyExists, DataLost, InvalidInput, NotFound, Unavailable
from cluster.ids import ShardId, shard_for_uuid
from cluster.query import QueryRequest
from cluster.settings import Settings, ShardSettings
from cluster.spec import CollectionSpec, VectorizerSpec
from cluster.types import KeywordSearch, ObjectBatch, VectorSearch
from cluster.validation import ObjectInput
from coordinator.service import Coordinator
from shard.engine import ShardEngine


class MemoryStore:
    def __init__(self) -> None:
        self.specs: dict[str, CollectionSpec] = {}
        self.placements: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}

    async def create_collection(self, spec: CollectionSpec) -> int:
        if spec.name in self.specs:
            raise AlreadyExists(f"collection {spec.name!r} already exists")
        self.specs[spec.name] = spec
        return len(self.specs)

    async def get_collection(self, name: str) -> CollectionSpec | None:
        return self.specs.get(name)

    async def list_collections(self) -> dict[str, CollectionSpec]:
        return dict(self.specs)

    async def delete_collection(self, name: str) -> bool:
        self.placements.pop(name, None)
        return self.specs.pop(name, None) is not None

    async def put_placement(
        self, collection: str, shard: int, replica: int, info: Mapping[str, Any]
    ) -> None:
        self.placements.setdefault(collection, {})[(shard, replica)] = dict(info)

    async def get_placements(self, collection: str) -> dict[tuple[int, int], dict[str, Any]]:
        return dict(self.placements.get(collection, {}))

    async def ping(self) -> bool:
        return True

    async def list_members(self) -> dict[str, dict[str, Any]]:
        return {"node-1": {"roles": ["coordinator"]}}


class EngineClient:
    """ShardClient over an in-process engine; ``down`` simulates a dead replica."""

    def __init__(self, engine: ShardEngine, shard_id: ShardId) -> None:
        self.engine = engine
        self.shard_id = shard_id
        self.down = False
        self.lost: str | None = None  # like ShardActor after a restart without its data

    def _check(self, serving: bool = False) -> None:
        if self.down:
            raise Unavailable(
                f"shard {self.shard_id} is unavailable", {"shard": str(self.shard_id)}
            )
        if serving and self.lost is not None:
            raise DataLost(self.lost, {"shard": str(self.shard_id)})

    async def ready(self, timeout_s: float) -> Mapping[str, Any]:
        self._check()
        return {"pid": 0, "node_id": "local", "data_lost": self.lost}

    async def upsert(self, batch: ObjectBatch, timeout_s: float) -> Any:
        self._check(serving=True)
        return self.engine.upsert(batch)

    async def delete(self, uuids: Sequence[str], timeout_s: float) -> list[bool]:
        self._check(serving=True)
        return self.engine.delete(uuids)

    async def get(self, uuid: str, include_vectors: bool, timeout_s: float) -> Any:
        self._check(serving=True)
        return self.engine.get(uuid, include_vectors)

    async def search(self, req: VectorSearch, timeout_s: float) -> Any:
        self._check(serving=True)
        return self.engine.search(req)

    async def keyword_search(self, req: KeywordSearch, timeout_s: float) -> Any:
        self._check(serving=True)
        return self.engine.keyword_search(req)

    async def list_objects(
        self, after: str | None, limit: int, include_vectors: bool, timeout_s: float
    ) -> Any:
        self._check(serving=True)
        return self.engine.list_objects(after, limit, include_vectors)

    async def stats(self, timeout_s: float) -> Any:
        self._check()
        return self.engine.stats()

    async def drop(self, timeout_s: float) -> None:
        self.engine.drop()

    async def clear_lost(self, timeout_s: float) -> str | None:
        self._check()
        lost, self.lost = self.lost, None
        return lost


class EnginePlacement:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.clients: dict[tuple[str, int, int], EngineClient] = {}

    def open_shard(
        self,
        spec: CollectionSpec,
        shard: int,
        replica: int,
        node_id: str = "",
        existed: bool = False,
    ) -> EngineClient:
        key = (spec.name, shard, replica)
        if key not in self.clients:
            engine = ShardEngine(
                spec,
                shard,
                self.root / spec.name / f"{shard}-{replica}",
                ShardSettings(fsync=False),
            )
            self.clients[key] = EngineClient(engine, ShardId(spec.name, shard))
        return self.clients[key]

    def kill_shard(self, spec: CollectionSpec, shard: int, replica: int) -> None:
        self.clients.pop((spec.name, shard, replica), None)

    def open_vectorizer(self, spec: VectorizerSpec) -> Any:
        raise AssertionError("no vectorizer in these tests")


SPEC = {
    "name": "Docs",
    "properties": [{"name": "text", "data_type": "text"}, {"name": "n", "data_type": "int"}],
    "vectors": [{"name": "mv", "dim": 8, "metric": "dot"}],
    "shard_count": 3,
}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    placement = EnginePlacement(tmp_path)
    coord = Coordinator(MemoryStore(), placement, Settings(data_dir=tmp_path))
    coord.placement = placement  # type: ignore[attr-defined]
    return coord


def load(coord: Coordinator, n: int = 60, seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    run(coord.create_collection(SPEC))
    ids = [str(uuid.UUID(int=int(rng.integers(1 << 62)) << 64 | i)) for i in range(n)]
    mats = [rng.normal(size=(int(rng.integers(2, 7)), 8)).astype(np.float32) for _ in ids]
    words = ["alpha", "beta", "gamma", "delta"]
    objs = [
        ObjectInput(i, {"text": f"{words[k % 4]} item {k}", "n": k}, {"mv": m})
        for k, (i, m) in enumerate(zip(ids, mats, strict=True))
    ]
    results = run(coord.upsert("Docs", objs))
    assert all(r.ok for r in results)
    return ids, mats


def exact(q: np.ndarray, ids: list[str], mats: list[np.ndarray]) -> list[str]:
    scores = [float((q @ m.T).max(1).sum()) for m in mats]
    return [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))]


def test_writes_are_routed_by_uuid_hash(coordinator: Coordinator) -> None:
    ids, _ = load(coordinator)
    placement = coordinator.placement  # type: ignore[attr-defined]
    for s in range(3):
        engine = placement.clients[("Docs", s, 0)].engine
        mine = {i for i in ids if shard_for_uuid(i, 3) == s}
        assert {o.uuid for o in engine.list_objects(None, 1000)} == mine


def test_query_merges_shards_and_applies_offset_once(coordinator: Coordinator) -> None:
    ids, mats = load(coordinator)
    q = np.random.default_rng(3).normal(size=(3, 8)).astype(np.float32)
    truth = exact(q, ids, mats)
    for offset, limit in [(0, 10), (5, 5), (17, 20)]:
        res = run(
            coordinator.query(
                QueryRequest(
                    "Docs", near_vector=q, limit=limit, offset=offset, return_metadata=("score",)
                )
            )
        )
        assert [o.uuid for o in res.objects] == truth[offset : offset + limit]


def test_bm25_and_hybrid_alpha_extremes(coordinator: Coordinator) -> None:
    from cluster.query import Bm25Query, HybridQuery

    ids, mats = load(coordinator)
    bm = run(coordinator.query(QueryRequest("Docs", bm25=Bm25Query("gamma"), limit=20)))
    assert len(bm.objects) == 15 and all("gamma" in o.properties["text"] for o in bm.objects)
    q = mats[4][:2]
    h0 = run(
        coordinator.query(
            QueryRequest("Docs", hybrid=HybridQuery("gamma", alpha=0.0, vector=q), limit=10)
        )
    )
    assert [o.uuid for o in h0.objects] == [o.uuid for o in bm.objects[:10]]
    h1 = run(
        coordinator.query(
            QueryRequest("Docs", hybrid=HybridQuery("gamma", alpha=1.0, vector=q), limit=10)
        )
    )
    assert [o.uuid for o in h1.objects] == exact(q, ids, mats)[:10]


def test_filters_reach_the_shards(coordinator: Coordinator) -> None:
    _ids, mats = load(coordinator)
    q = mats[0][:1]
    flt = {"path": "n", "operator": "greater_than_equal", "value": 55}
    res = run(coordinator.query(QueryRequest("Docs", near_vector=q, filters=flt, limit=10)))
    assert sorted(o.properties["n"] for o in res.objects) == [55, 56, 57, 58, 59]
    with pytest.raises(NotFound):
        run(
            coordinator.query(
                QueryRequest(
                    "Docs",
                    near_vector=q,
                    limit=3,
                    filters={"path": "nope", "operator": "equal", "value": 1},
                )
            )
        )


def test_unavailable_shard_fails_or_gives_partial_results(coordinator: Coordinator) -> None:
    load(coordinator)
    coordinator.placement.clients[("Docs", 1, 0)].down = True  # type: ignore[attr-defined]
    q = np.ones((1, 8), dtype=np.float32)
    with pytest.raises(Unavailable, match="Docs:1"):
        run(coordinator.query(QueryRequest("Docs", near_vector=q, limit=5)))
    res = run(coordinator.query(QueryRequest("Docs", near_vector=q, limit=5, partial=True)))
    assert res.missing_shards == (1,) and len(res.objects) == 5


def test_schema_errors(coordinator: Coordinator) -> None:
    load(coordinator)
    with pytest.raises(AlreadyExists):
        run(coordinator.create_collection(SPEC))
    with pytest.raises(NotFound):
        run(coordinator.query(QueryRequest("Nope", near_vector=np.ones((1, 8)))))
    with pytest.raises(InvalidInput):
        run(coordinator.query(QueryRequest("Docs", near_vector=np.ones((1, 8)), limit=0)))
    with pytest.raises(InvalidInput, match="exactly one"):
        run(coordinator.query(QueryRequest("Docs")))
    run(coordinator.delete_collection("Docs"))
    with pytest.raises(NotFound):
        coordinator.spec("Docs")


def test_collections_per_cluster_are_capped(tmp_path: Path) -> None:
    placement = EnginePlacement(tmp_path)
    coord = Coordinator(MemoryStore(), placement, Settings(data_dir=tmp_path, max_collections=2))
    small = {"name": "A", "vectors": [{"name": "v", "dim": 4}], "shard_count": 1}
    run(coord.create_collection(small))
    run(coord.create_collection({**small, "name": "B"}))
    with pytest.raises(InvalidInput, match="limit is 2") as err:
        run(coord.create_collection({**small, "name": "C"}))
    assert err.value.details["limit"] == "max_collections"
    with pytest.raises(AlreadyExists):  # a duplicate is still a duplicate, not a limit
        run(coord.create_collection({**small, "name": "A"}))
    assert [s.name for s in run(coord.list_collections())] == ["A", "B"]
    run(coord.delete_collection("B"))
    run(coord.create_collection({**small, "name": "C"}))  # room again


def test_delete_where(coordinator: Coordinator) -> None:
    _ids, _ = load(coordinator)
    flt = {"path": "text", "operator": "like", "value": "alpha*"}
    dry = run(coordinator.delete_where("Docs", flt, dry_run=True))
    assert dry == {"matched": 15, "deleted": 0, "dry_run": True}
    out = run(coordinator.delete_where("Docs", flt))
    assert out["deleted"] == 15
    left = run(coordinator.list_objects("Docs", None, 1000, False))
    assert len(left) == 45 and not any(o.properties["text"].startswith("alpha") for o in left)


def test_cluster_info_lists_members_and_placements(coordinator: Coordinator) -> None:
    load(coordinator)
    info = run(coordinator.cluster_info())
    assert info["members"] == {"node-1": {"roles": ["coordinator"]}}
    placements = info["collections"]["Docs"]["placements"]
    assert [(p["shard"], p["replica"], p["state"]) for p in placements] == [
        (0, 0, "ready"),
        (1, 0, "ready"),
        (2, 0, "ready"),
    ]


# ---- writes that a vectorizer encodes: validated whole, encoded and written in chunks --------

VEC_SPEC = {
    "name": "Vec",
    "properties": [{"name": "text", "data_type": "text"}, {"name": "n", "data_type": "int"}],
    "vectors": [
        {
            "name": "mv",
            "dim": 8,
            "metric": "dot",
            "vectorizer": {"kind": "text2colbert-local", "source_properties": ["text"]},
        }
    ],
    "shard_count": 2,
}


class LoggingVectorizer:
    """A vectorizer client that logs what it encodes into a shared event log."""

    parallelism = 1

    def __init__(self, events: list[tuple[str, int]]) -> None:
        self.events = events

    async def dim(self, timeout_s: float) -> int:
        return 8

    async def encode_documents(
        self, texts: Sequence[str], api_key: str | None, timeout_s: float
    ) -> list[np.ndarray]:
        self.events.append(("encode", len(texts)))
        return [np.full((3, 8), float(len(t)), dtype=np.float32) for t in texts]

    async def encode_query(self, text: str, api_key: str | None, timeout_s: float) -> Any:
        return np.ones((2, 8), dtype=np.float32)


@pytest.fixture
def vectorizing(tmp_path: Path) -> tuple[Coordinator, list[tuple[str, int]]]:
    events: list[tuple[str, int]] = []

    class Placement(EnginePlacement):
        def open_vectorizer(self, spec: VectorizerSpec) -> Any:
            return LoggingVectorizer(events)

        def open_shard(
            self,
            spec: CollectionSpec,
            shard: int,
            replica: int,
            node_id: str = "",
            existed: bool = False,
        ) -> EngineClient:
            client = super().open_shard(spec, shard, replica, node_id, existed)
            inner = client.upsert

            async def upsert(batch: ObjectBatch, timeout_s: float) -> Any:
                events.append(("write", len(batch)))
                return await inner(batch, timeout_s)

            client.upsert = upsert  # type: ignore[method-assign]
            return client

    placement = Placement(tmp_path)
    coord = Coordinator(
        MemoryStore(), placement, Settings(data_dir=tmp_path, max_vectorize_objects=400)
    )
    coord.placement = placement  # type: ignore[attr-defined]
    run(coord.create_collection(VEC_SPEC))
    return coord, events


def _texts(n: int) -> list[ObjectInput]:
    return [ObjectInput(None, {"text": f"text number {i}", "n": i}) for i in range(n)]


def test_vectorized_import_is_encoded_and_written_in_chunks(
    vectorizing: tuple[Coordinator, list[tuple[str, int]]],
) -> None:
    from coordinator import service

    coord, events = vectorizing
    results = run(coord.upsert("Vec", _texts(350)))
    assert len(results) == 350 and all(r.ok for r in results)
    assert len({r.uuid for r in results}) == 350
    # Never more than one chunk of embeddings encoded and not yet written.
    held = peak = 0
    for kind, n in events:
        held = held + n if kind == "encode" else max(0, held - n)
        peak = max(peak, held)
    assert peak <= service.VECTORIZE_CHUNK
    assert sum(n for kind, n in events if kind == "encode") == 350
    assert sum(n for kind, n in events if kind == "write") == 350
    placement = coord.placement  # type: ignore[attr-defined]
    stored = sum(c.engine.count() for c in placement.clients.values())
    assert stored == 350


def test_vectorized_import_over_the_limit_or_with_a_bad_object_writes_nothing(
    vectorizing: tuple[Coordinator, list[tuple[str, int]]],
) -> None:
    from cluster.errors import PayloadTooLarge

    coord, events = vectorizing
    with pytest.raises(PayloadTooLarge) as too_many:
        run(coord.upsert("Vec", _texts(401)))
    assert too_many.value.details["limit"] == "max_vectorize_objects"
    objects = _texts(300)
    objects[290] = ObjectInput(None, {"text": "bad", "n": "not a number"})
    with pytest.raises(InvalidInput) as bad:
        run(coord.upsert("Vec", objects))
    assert bad.value.details["index"] == 290
    assert events == []  # nothing encoded, nothing written
    placement = coord.placement  # type: ignore[attr-defined]
    assert sum(c.engine.count() for c in placement.clients.values()) == 0


def test_vectorized_import_past_its_deadline_stops(
    vectorizing: tuple[Coordinator, list[tuple[str, int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the write deadline the rest of the batch is not encoded or written: the chunks
    before it are (the error says how many), and a retry with the same ids overwrites them."""
    from dataclasses import replace

    from cluster.errors import DeadlineExceeded

    coord, events = vectorizing
    coord._settings = replace(coord._settings, write_timeout_s=0.0)
    objects = [ObjectInput(str(uuid.uuid4()), o.properties) for o in _texts(300)]
    with pytest.raises(DeadlineExceeded) as late:
        run(coord.upsert("Vec", objects))
    written = late.value.details["written"]
    assert written == 0 and events == []
    coord._settings = replace(coord._settings, write_timeout_s=120.0)
    assert all(r.ok for r in run(coord.upsert("Vec", objects)))
    assert all(r.ok for r in run(coord.upsert("Vec", objects)))  # the retry: no duplicates
    placement = coord.placement  # type: ignore[attr-defined]
    assert sum(c.engine.count() for c in placement.clients.values()) == 300
