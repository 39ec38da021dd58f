"""``ShardActor`` outside Ray: a restart that finds the data directory empty (Ray moved the actor
to a node without its data) refuses every read and write with ``DataLost`` until cleared, and
remembers that across restarts; a first start, or a restart next to its data, serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.errors import DataLost
from cluster.types import VectorSearch
from shard.actor import LOST_MARKER, ShardActor
from tests.unit.test_shard_support import batch, make_spec, random_docs, settings, uid


def _actor(path: Path, restarted: bool) -> ShardActor:
    return ShardActor(make_spec().to_json(), 0, str(path), settings(), restarted=restarted)


def test_first_start_and_restart_next_to_its_data_serve(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    actor = _actor(tmp_path / "shard", restarted=False)  # a new shard: an empty dir is normal
    assert actor.ready()["data_lost"] is None
    actor.upsert(batch([1, 2], {"v": random_docs(rng, 2, 8)}))
    actor.drop()
    actor = _actor(tmp_path / "again", restarted=False)
    actor.upsert(batch([1], {"v": random_docs(rng, 1, 8)}))
    actor._engine.close()
    restarted = _actor(tmp_path / "again", restarted=True)  # Ray restarted it, same node
    assert restarted.ready()["data_lost"] is None
    assert restarted.get(uid(1), False) is not None


def test_restart_with_an_empty_data_dir_refuses_until_cleared(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "moved"
    actor = _actor(path, restarted=True)
    lost = actor.ready()["data_lost"]
    assert lost is not None and "with an empty data directory" in lost and str(path) in lost
    q = np.ones((1, 8), np.float32)
    calls = [
        lambda: actor.search(VectorSearch("v", q, 5)),
        lambda: actor.get(uid(1), False),
        lambda: actor.list_objects(None, 10, False),
        lambda: actor.upsert(batch([1], {"v": random_docs(rng, 1, 8)})),
        lambda: actor.delete([uid(1)]),
    ]
    for call in calls:
        with pytest.raises(DataLost, match="restarted on node"):
            call()
    stats = actor.stats()  # stats and ready still answer, and say what happened
    assert stats.n_objects == 0 and stats.data_lost == lost
    # Another restart on this node: the dir is no longer empty, but the loss is remembered.
    actor._engine.close()
    again = _actor(path, restarted=True)
    assert again.ready()["data_lost"] == lost
    assert (path / LOST_MARKER).exists()
    assert again.clear_lost() == lost
    assert not (path / LOST_MARKER).exists() and again.ready()["data_lost"] is None
    assert again.stats().data_lost is None
    again.upsert(batch([1], {"v": random_docs(rng, 1, 8)}))
    assert [h.uuid for h in again.search(VectorSearch("v", q, 5)).hits] == [uid(1)]
    assert again.clear_lost() is None
    again._engine.close()
    assert _actor(path, restarted=True).ready()["data_lost"] is None
