"""The shard's BM25 index (``shard.bm25``) kept in step with the engine's objects.

Consistency with the WAL: every write reaches the WAL first, then the BM25 buffer; the engine
commits BM25 before each checkpoint (manifest write), so after a crash the committed BM25 holds at
least every write up to the manifest's checkpoint, and replaying the WAL generations from there
re-applies the rest (BM25 upserts/deletes are idempotent per uuid). Hits are checked against the
engine's live objects anyway, so a document BM25 kept that the engine lost can never surface.

The index is rebuilt from the sealed segments (then the WAL replay) when its directory is missing,
was built for other fields, or was never committed at a checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster.spec import CollectionSpec
from shard.bm25 import Bm25Index, Bm25SchemaMismatch

logger = logging.getLogger(__name__)


def searchable_fields(spec: CollectionSpec) -> list[str]:
    return [p.name for p in spec.properties if p.searchable and p.data_type in ("text", "text[]")]


class KeywordIndex:
    """Thread-safe wrapper: buffered writes, commit on demand (before a search or a checkpoint)."""

    def __init__(
        self, directory: Path, fields: Sequence[str], committed_fields: Sequence[str] | None
    ) -> None:
        self.fields = list(fields)
        self._lock = threading.Lock()
        self._dirty = False
        self.rebuilt = (
            committed_fields is None
            or list(committed_fields) != self.fields
            or not directory.exists()
        )
        if self.rebuilt:
            shutil.rmtree(directory, ignore_errors=True)
        try:
            self._index = Bm25Index(directory, self.fields)
        except Bm25SchemaMismatch:
            logger.warning("BM25 index at %s has other fields; rebuilding", directory)
            shutil.rmtree(directory, ignore_errors=True)
            self._index = Bm25Index(directory, self.fields)
            self.rebuilt = True

    def upsert(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        batch = list(items)
        if batch:
            with self._lock:
                self._index.upsert(batch)
                self._dirty = True

    def delete(self, uuids: Sequence[str]) -> None:
        if uuids:
            with self._lock:
                self._index.delete(uuids)
                self._dirty = True

    def commit(self) -> None:
        with self._lock:
            self._commit_locked()

    def _commit_locked(self) -> None:
        if self._dirty:
            self._index.commit()
            self._dirty = False

    def search(
        self, query: str, k: int, fields: Sequence[str] | None, allow: Callable[[str], bool]
    ) -> list[tuple[str, float]]:
        with self._lock:  # read-your-writes: what was acknowledged is searchable
            self._commit_locked()
            return self._index.search(query, k, fields, allow)

    def close(self) -> None:
        with self._lock:
            try:
                self._commit_locked()
            finally:
                self._index.close()
