"""Property encoding shared by the WAL and sealed segments, and small file helpers.

Properties are stored as one compact JSON document per object. Values arrive type-checked; the
only non-JSON types we expect are dates (``datetime``/``date``, stored as ISO-8601 strings, which
is also how the gateway's wire form carries them), ``uuid.UUID`` (stored as its string) and numpy
scalars (stored as the Python number).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
import uuid as uuid_mod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from cluster.errors import Unavailable


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid_mod.UUID):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"property value of type {type(value).__name__} is not storable")


def encode_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def encode_properties(properties: Mapping[str, Any]) -> str:
    return encode_json(dict(properties))


def decode_properties(text: str) -> dict[str, Any]:
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


def fsync_dir(path: Path) -> None:
    """Make a rename/create inside ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def write_atomic(path: Path, data: bytes, *, fsync: bool) -> None:
    """Write-temp, fsync, rename, fsync dir: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def dir_size_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed by compaction meanwhile
                continue
    return total


def lock_dir(data_dir: Path, name: str) -> TextIO:
    """One engine per data directory: two WAL writers would interleave records."""
    f = open(data_dir / "LOCK", "a+")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        f.close()
        raise Unavailable(
            f"shard {name}: {data_dir} is open in another engine", {"data_dir": str(data_dir)}
        ) from exc
    return f


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
