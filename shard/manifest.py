"""A shard's files on disk besides the WAL and the segments' own: the manifest, tombstone files,
persisted indexes and calibrations. What recovery reads and checkpoints write (``shard.engine``).

``manifest.json`` (replaced atomically: write temp, fsync, rename, fsync dir)::

    {"format": 1, "seq": <checkpoint number>, "next_segment_id": <id>,
     "wal_generation": <replay the WAL from this generation>,
     "segments": [{"id": <id>, "n_objects": <n>, "deleted": "deleted-<seq>.bits" | null}, ...],
     "spec": <the collection spec>, "shard": <n>, "bm25_fields": [...]}

A sealed segment's tombstones are a packed bit mask, one bit per object, in the file its entry
names inside the segment directory; a checkpoint that changed the mask writes a new file and
the old one is garbage once the manifest naming the new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.spec import NamedVectorSpec
from shard.calibrate import Calibration
from shard.codec import remove_path, write_atomic
from shard.index import ScannTokenIndex
from shard.muvera import MuveraIndex
from shard.segment import Bools

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class SegmentEntry:
    id: int
    n_objects: int
    deleted: str | None  # its tombstone file, None when nothing is deleted


@dataclass(frozen=True)
class Manifest:
    seq: int = 0
    next_segment_id: int = 0
    wal_generation: int = 0
    segments: tuple[SegmentEntry, ...] = ()
    bm25_fields: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # spec and shard: for people

    @classmethod
    def read(cls, data_dir: Path) -> Manifest:
        """The shard's manifest; an empty one for a new shard."""
        path = data_dir / MANIFEST
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            int(raw.get("seq", 0)),
            int(raw.get("next_segment_id", 0)),
            int(raw.get("wal_generation", 0)),
            tuple(
                SegmentEntry(int(e["id"]), int(e.get("n_objects", 0)), e.get("deleted"))
                for e in raw.get("segments", [])
            ),
            raw.get("bm25_fields"),
        )

    def write(self, data_dir: Path, *, fsync: bool) -> None:
        body: dict[str, Any] = {
            "format": 1,
            "seq": self.seq,
            "next_segment_id": self.next_segment_id,
            "wal_generation": self.wal_generation,
            "segments": [
                {"id": e.id, "n_objects": e.n_objects, "deleted": e.deleted} for e in self.segments
            ],
            **self.extra,
        }
        if self.bm25_fields is not None:
            body["bm25_fields"] = self.bm25_fields
        write_atomic(data_dir / MANIFEST, json.dumps(body, indent=1).encode(), fsync=fsync)


def segment_dir(segments_dir: Path, segment_id: int) -> Path:
    return segments_dir / f"seg-{segment_id:08d}"


def tombstone_file(seq: int) -> str:
    """The name of the tombstone file checkpoint ``seq`` writes."""
    return f"deleted-{seq:012d}.bits"


def write_tombstones(directory: Path, name: str, mask: Bools, *, fsync: bool) -> None:
    write_atomic(directory / name, np.packbits(mask).tobytes(), fsync=fsync)


def read_tombstones(directory: Path, name: str, n_objects: int) -> Bools:
    bits = np.fromfile(directory / name, dtype=np.uint8)
    return np.unpackbits(bits, count=n_objects).astype(np.bool_)


def remove_unreferenced(segments_dir: Path, referenced: Iterable[str]) -> None:
    """Delete the segment directories no manifest entry names: an unfinished seal or
    compaction, or the sources of a merge already in the manifest."""
    keep = set(referenced)
    for name in os.listdir(segments_dir):
        if name not in keep:
            shutil.rmtree(segments_dir / name, ignore_errors=True)


def clean_segment_dir(directory: Path, tombstones: str | None) -> None:
    """Delete temporary files and every tombstone file but the current one."""
    for entry in os.listdir(directory):
        if entry.endswith(".tmp") or (entry.startswith("deleted-") and entry != tombstones):
            remove_path(directory / entry)


def load_index(
    directory: Path, v: NamedVectorSpec, n_objects: int
) -> ScannTokenIndex | MuveraIndex:
    """A persisted index of the kind the spec asks for (else ValueError: it is rebuilt)."""
    if MuveraIndex.is_muvera_dir(directory):
        if v.index.kind != "muvera":
            raise ValueError(f"a MUVERA index, but the index kind is {v.index.kind!r}")
        fde = MuveraIndex.load(directory)
        if fde.n_docs != n_objects or fde.params.dim != v.dim:
            raise ValueError(
                f"FDEs of {fde.n_docs} documents, dim {fde.params.dim}; the "
                f"segment has {n_objects}, dim {v.dim}"
            )
        return fde
    if v.index.kind != "scann":
        raise ValueError(f"a ScaNN index, but the index kind is {v.index.kind!r}")
    return ScannTokenIndex.load(directory)


def write_calibrations(
    data_dir: Path, calibrations: Mapping[str, Calibration], *, fsync: bool
) -> None:
    body = {"format": 1, "vectors": {n: c.to_dict() for n, c in calibrations.items()}}
    write_atomic(data_dir / CALIBRATION_FILE, json.dumps(body, indent=1).encode(), fsync=fsync)


def read_calibrations(data_dir: Path, vectors: Iterable[str]) -> dict[str, Calibration]:
    """The persisted calibrations of ``vectors`` ({} when none were written); ValueError,
    KeyError, TypeError or AttributeError when the file is unreadable."""
    path = data_dir / CALIBRATION_FILE
    if not path.exists():
        return {}
    names = set(vectors)
    raw = json.loads(path.read_text())
    return {
        name: Calibration.from_dict(entry)
        for name, entry in dict(raw.get("vectors", {})).items()
        if name in names
    }
