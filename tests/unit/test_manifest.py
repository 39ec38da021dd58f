"""shard.manifest (the shard's files besides WAL and segments) and shard.maintenance's pure
decisions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cluster.settings import ShardSettings
from cluster.spec import CollectionSpec
from shard.maintenance import WAL_CHECKPOINT_BYTES, MaintenancePolicy
from shard.manifest import (
    MANIFEST,
    Manifest,
    SegmentEntry,
    clean_segment_dir,
    read_tombstones,
    remove_unreferenced,
    tombstone_file,
    write_tombstones,
)

SPEC = CollectionSpec.from_dict({"name": "M", "vectors": [{"name": "v", "dim": 4}]})


def test_manifest_round_trip_and_format(tmp_path: Path) -> None:
    assert Manifest.read(tmp_path) == Manifest()  # a new shard
    m = Manifest(
        3,
        9,
        2,
        (SegmentEntry(4, 10, tombstone_file(3)), SegmentEntry(7, 5, None)),
        ["text"],
        {"spec": SPEC.to_dict(), "shard": 1},
    )
    m.write(tmp_path, fsync=False)
    raw = json.loads((tmp_path / MANIFEST).read_text())
    assert list(raw) == [
        "format",
        "seq",
        "next_segment_id",
        "wal_generation",
        "segments",
        "spec",
        "shard",
        "bm25_fields",
    ]
    assert raw["segments"][0] == {"id": 4, "n_objects": 10, "deleted": "deleted-000000000003.bits"}
    back = Manifest.read(tmp_path)
    assert (back.seq, back.next_segment_id, back.wal_generation) == (3, 9, 2)
    assert back.segments == m.segments and back.bm25_fields == ["text"]


def test_tombstones_and_cleanup(tmp_path: Path) -> None:
    seg = tmp_path / "segments" / "seg-00000001"
    seg.mkdir(parents=True)
    (tmp_path / "segments" / "seg-00000002.tmp").mkdir()
    mask = np.zeros(11, dtype=np.bool_)
    mask[[0, 5, 10]] = True
    write_tombstones(seg, tombstone_file(1), mask, fsync=False)
    write_tombstones(seg, tombstone_file(2), mask, fsync=False)
    (seg / "x.tmp").write_bytes(b"")
    assert read_tombstones(seg, tombstone_file(2), 11).tolist() == mask.tolist()
    clean_segment_dir(seg, tombstone_file(2))
    assert sorted(p.name for p in seg.iterdir()) == [tombstone_file(2)]
    remove_unreferenced(tmp_path / "segments", ["seg-00000001"])
    assert [p.name for p in (tmp_path / "segments").iterdir()] == ["seg-00000001"]


def test_maintenance_decisions() -> None:
    st = ShardSettings(
        seal_threshold_tokens=1000,
        brute_force_max_tokens=100,
        seal_idle_s=3.0,
        index_defer_tokens=500,
    )
    policy = MaintenancePolicy(SPEC, st)
    assert policy.seal_due(1000, 0, idle=False)
    assert not policy.seal_due(999, 0, idle=False)
    assert policy.seal_due(100, 0, idle=True) and not policy.seal_due(99, 0, idle=True)
    assert policy.seal_due(1, WAL_CHECKPOINT_BYTES, idle=False)
    assert policy.defer_tokens() == 500  # never searched
    assert policy.defer_tokens(last_search_at=float("inf")) == 0  # searched just now
    assert MaintenancePolicy(SPEC, ShardSettings(seal_idle_s=0)).defer_tokens() == 0
    assert not policy.index_due(499, idle=False, defer=500)
    assert policy.index_due(500, idle=False, defer=500)
    assert policy.index_due(1, idle=True, defer=500)
    assert policy.index_due(1, idle=False, defer=500, merged_from_indexed=True)
    assert policy.index_due(1, idle=False, defer=0)
    assert policy.compaction([], idle=True, defer=0) == []
