"""BM25 keyword index of one shard (tantivy; the only module that touches it).

One tantivy document per object: ``id`` (the uuid, raw token, stored) plus one text field per
searchable property (``p_<name>``; a text[] property adds one value per element). Text is split
into lower-cased alphanumeric runs (tantivy's simple tokenizer + lowercase; tokens of 40+ bytes
are dropped), the same word tokenisation ``cluster.filters.text_tokens`` uses.

Scoring is tantivy's BM25 (k1 = 1.2, b = 0.75, idf = ln(1 + (N - n + 0.5) / (n + 0.5)),
statistics per field over the whole shard). A query is the user's text tokenised with the same
analyzer and built programmatically as a disjunction of term queries (each distinct term × each
field, scores summed), so no character of the user's text is ever query syntax.

Writes are buffered until ``commit()``; ``search`` and ``count`` see committed data only. Like
tantivy, N and document frequencies still count deleted documents until their segment merges,
so scores drift slightly after deletes. One owner (the shard engine) drives an instance; the
writer (a 32 MB arena, one thread) is opened on the first write and held until ``close()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import tantivy

from cluster.errors import InternalError, InvalidInput

ID_FIELD: Final = "id"
TOKENIZER: Final = "colshard_words"
MAX_TOKEN_BYTES: Final = 40
WRITER_HEAP_BYTES: Final = 32_000_000  # per thread; tantivy needs at least 15 MB
_FIELD_PREFIX: Final = "p_"  # keeps property names apart from ID_FIELD
_MIN_FETCH: Final = 16


class Bm25SchemaMismatch(InternalError):
    """The index on disk was built for other fields; delete it and re-index the shard."""


def _analyzer() -> tantivy.TextAnalyzer:
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(MAX_TOKEN_BYTES))
        .filter(tantivy.Filter.lowercase())
        .build()
    )


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Iterable) and not isinstance(value, bytes | Mapping):
        yield from (v for v in value if isinstance(v, str))  # text[]: list, tuple, ndarray


class Bm25Index:
    """BM25 over the searchable text / text[] ``fields``; ``path=None`` keeps it in RAM."""

    def __init__(self, path: Path | None, fields: Sequence[str]) -> None:
        self.fields: tuple[str, ...] = tuple(dict.fromkeys(fields))
        builder = tantivy.SchemaBuilder()
        builder.add_text_field(ID_FIELD, stored=True, tokenizer_name="raw")
        for name in self.fields:
            builder.add_text_field(
                _FIELD_PREFIX + name, tokenizer_name=TOKENIZER, index_option="freq"
            )
        self._schema = builder.build()
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        try:
            self._index = tantivy.Index(self._schema, path=None if path is None else str(path))
        except ValueError as exc:
            if "schema does not match" in str(exc):
                raise Bm25SchemaMismatch(
                    f"BM25 index at {path} was built for other fields than {list(self.fields)}",
                    {"path": str(path), "fields": list(self.fields)},
                ) from exc
            raise
        self._analyzer = _analyzer()
        self._index.register_tokenizer(TOKENIZER, self._analyzer)
        self._writer: tantivy.IndexWriter | None = None

    # ------------------------------------------------------------------ writes

    def _open_writer(self) -> tantivy.IndexWriter:
        if self._writer is None:
            self._writer = self._index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=1)
        return self._writer

    def upsert(self, items: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """Index ``(uuid, properties)`` pairs, replacing any document with the same uuid."""
        writer = self._open_writer()
        for uuid, properties in items:
            writer.delete_documents_by_term(ID_FIELD, uuid)
            doc = tantivy.Document()
            doc.add_text(ID_FIELD, uuid)
            for name in self.fields:
                for text in _texts(properties.get(name)):
                    doc.add_text(_FIELD_PREFIX + name, text)
            writer.add_document(doc)

    def delete(self, uuids: Iterable[str]) -> None:
        writer = self._open_writer()
        for uuid in uuids:
            writer.delete_documents_by_term(ID_FIELD, uuid)

    def commit(self) -> None:
        """Make buffered writes durable and visible to ``search``."""
        if self._writer is not None:
            self._writer.commit()
        self._index.reload()

    # ------------------------------------------------------------------ reads

    def count(self) -> int:
        """Live documents as of the last commit."""
        return int(self._index.searcher().num_docs)

    def terms(self, text: str) -> list[str]:
        """The distinct query terms ``text`` yields, in order of first appearance."""
        return list(dict.fromkeys(self._analyzer.analyze(text)))

    def search(
        self,
        query: str,
        k: int,
        fields: Sequence[str] | None = None,
        allow: Callable[[str], bool] | None = None,
    ) -> list[tuple[str, float]]:
        """Top ``k`` ``(uuid, score)`` best first, ties by uuid.

        ``fields`` restricts the search to some of the indexed fields (None = all).
        ``allow(uuid)`` is the filter: the search over-fetches until it has ``k`` allowed hits
        or has seen every match, so a selective filter still returns ``k`` hits when they exist.
        """
        if k <= 0:
            return []
        targets = self._targets(fields)
        terms = self.terms(query)
        if not targets or not terms:
            return []
        schema = self._index.schema
        q = tantivy.Query.boolean_query(
            [
                (
                    tantivy.Occur.Should,
                    tantivy.Query.term_query(schema, _FIELD_PREFIX + f, t, index_option="freq"),
                )
                for t in terms
                for f in targets
            ]
        )
        searcher = self._index.searcher()
        n_docs = int(searcher.num_docs)
        if n_docs == 0:
            return []
        seen: dict[tuple[int, int], tuple[str, bool]] = {}  # address -> (uuid, allowed)
        # One past k, so a tie at the k-th place shows; more when a filter will drop hits.
        fetch = min(n_docs, k + 1 if allow is None else 2 * k + _MIN_FETCH)
        while True:
            raw = searcher.search(q, limit=fetch, count=False).hits
            hits: list[tuple[str, float]] = []
            for score, address in raw:
                key = (address.segment_ord, address.doc)
                if key not in seen:
                    uuid = str(searcher.doc(address).get_first(ID_FIELD))
                    seen[key] = (uuid, allow is None or allow(uuid))
                uuid, allowed = seen[key]
                if allowed:
                    hits.append((uuid, float(score)))
            exhausted = len(raw) < fetch or fetch >= n_docs
            # Done when the k-th allowed hit beats the last fetched score: nothing unfetched
            # can then enter the top k or tie with it.
            if exhausted or (len(hits) >= k and hits[k - 1][1] > float(raw[-1][0])):
                break
            fetch = min(n_docs, fetch * 4)
        hits.sort(key=lambda h: (-h[1], h[0]))
        return hits[:k]

    def _targets(self, fields: Sequence[str] | None) -> tuple[str, ...]:
        if fields is None:
            return self.fields
        unknown = [f for f in fields if f not in self.fields]
        if unknown:
            raise InvalidInput(
                f"not searchable by BM25: {unknown}; searchable properties: {list(self.fields)}",
                {"properties": unknown},
            )
        return tuple(dict.fromkeys(fields))

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release the writer and its directory lock; uncommitted writes are dropped."""
        if self._writer is not None:
            self._writer.wait_merging_threads()  # consumes the writer
            self._writer = None
