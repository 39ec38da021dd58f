"""ShardEngine.keyword_search: BM25 kept in step with upserts, deletes, seals and restarts."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cluster.types import KeywordSearch
from tests.unit.test_shard_support import batch, drain, make_spec, open_engine, uid

TEXTS = [
    "the quick brown fox",
    "a lazy dog sleeps",
    "quick quick fox jumps",
    "nothing to see here",
    "brown dog and brown fox",
]


class NEquals:
    def __init__(self, n: int) -> None:
        self.n = n

    def matches(self, properties: Mapping[str, Any]) -> bool:
        return properties.get("n") == self.n


def _vecs(n: int) -> dict[str, list[np.ndarray | None]]:
    return {"v": [np.ones((2, 8), dtype=np.float32) for _ in range(n)]}


def _ids(engine: Any, text: str, k: int = 10, **kw: Any) -> list[str]:
    return [h.uuid for h in engine.keyword_search(KeywordSearch(text, k, **kw)).hits]


def _load(tmp_path: Path, **kw: Any) -> Any:
    engine = open_engine(tmp_path, make_spec(), **kw)
    engine.upsert(batch(range(5), _vecs(5), [{"title": t, "n": i} for i, t in enumerate(TEXTS)]))
    return engine


def test_bm25_ranks_and_follows_writes(tmp_path: Path) -> None:
    engine = _load(tmp_path)
    assert _ids(engine, "quick fox") == [uid(2), uid(0), uid(4)]
    assert set(_ids(engine, "dog")) == {uid(1), uid(4)}
    assert _ids(engine, "fox", filter=NEquals(4)) == [uid(4)]
    hit = engine.keyword_search(KeywordSearch("sleeps", 5, return_properties=("n",))).hits[0]
    assert hit.uuid == uid(1) and hit.properties == {"n": 1} and hit.score > 0
    engine.delete([uid(2)])
    assert uid(2) not in _ids(engine, "quick fox")
    engine.upsert(batch([0], _vecs(1), [{"title": "slow turtle", "n": 0}]))
    assert _ids(engine, "quick") == []
    assert _ids(engine, "turtle") == [uid(0)]
    assert _ids(engine, "") == []
    engine.close()


def test_bm25_survives_restart_seal_and_rebuild(tmp_path: Path) -> None:
    engine = _load(tmp_path, seal_threshold_tokens=4)
    drain(engine)  # sealed + checkpoint: BM25 committed with the manifest
    engine.delete([uid(0)])  # only in the WAL
    engine.upsert(batch([9], _vecs(1), [{"title": "red fox", "n": 9}]))
    want = _ids(engine, "fox")
    assert sorted(want) == sorted([uid(9), uid(2), uid(4)])
    engine.close()

    engine = open_engine(tmp_path, make_spec(), seal_threshold_tokens=4)
    assert _ids(engine, "fox") == want
    engine.close()

    shutil.rmtree(tmp_path / "shard" / "bm25")  # lost index: rebuilt from segments + WAL
    engine = open_engine(tmp_path, make_spec(), seal_threshold_tokens=4)
    assert _ids(engine, "fox") == want
    engine.close()


def test_no_searchable_properties_means_no_hits(tmp_path: Path) -> None:
    spec = make_spec(properties=[{"name": "n", "data_type": "int"}])
    engine = open_engine(tmp_path, spec)
    engine.upsert(batch([1], _vecs(1), [{"n": 1}]))
    res = engine.keyword_search(KeywordSearch("anything", 3))
    assert res.hits == () and res.n_objects == 1
    engine.close()
