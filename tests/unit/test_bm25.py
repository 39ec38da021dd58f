"""shard.bm25: scoring (vs tantivy, vs the formula), writes, reopen, hostile queries, filters."""

from __future__ import annotations

import math
import random
import uuid as uuid_mod
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tantivy
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import InvalidInput
from cluster.filters import text_tokens
from shard.bm25 import Bm25Index, Bm25SchemaMismatch

VOCAB = ["apple", "banana", "cherry", "date", "elder", "fig", "grape", "honey", "ice", "jam"]


def uid(i: int) -> str:
    return str(uuid_mod.UUID(int=i))


def corpus(n: int, seed: int, fields: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        props = {
            f: " ".join(rng.choices(VOCAB[: 4 + i % 6], k=rng.randint(1, 30)))
            for f in fields
            if rng.random() < 0.9
        }
        docs.append((uid(i), props))
    return docs


def build(
    items: list[tuple[str, dict[str, Any]]], fields: tuple[str, ...], path: Path | None = None
) -> Bm25Index:
    index = Bm25Index(path, fields)
    index.upsert(items)
    index.commit()
    return index


def reference_bm25(
    docs: Mapping[str, str], query: str, k1: float = 1.2, b: float = 0.75
) -> dict[str, float]:
    """Textbook BM25 (tantivy's variant of idf) over one field; every doc counts in N/avgdl."""
    tokens = {u: text_tokens(t) for u, t in docs.items()}
    n_docs = len(tokens)
    avgdl = sum(len(t) for t in tokens.values()) / n_docs
    scores: dict[str, float] = {}
    for term in dict.fromkeys(text_tokens(query)):
        df = sum(term in t for t in tokens.values())
        if df == 0:
            continue
        idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
        for u, toks in tokens.items():
            tf = Counter(toks)[term]
            if tf:
                norm = k1 * (1 - b + b * len(toks) / avgdl)
                scores[u] = scores.get(u, 0.0) + idf * tf * (k1 + 1) / (tf + norm)
    return scores


def ranked(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda h: (-h[1], h[0]))


QUERIES = [
    "apple",
    "banana cherry",
    "fig grape honey",
    "jam",
    "apple apple date",
    "kiwi",
    "ICE, Elder!",
]


# ------------------------------------------------------------------ scoring


@pytest.mark.parametrize("query", QUERIES)
def test_single_field_matches_reference_formula(query: str) -> None:
    items = corpus(40, seed=1, fields=("body",))
    index = build(items, ("body",))
    texts = {u: p.get("body", "") for u, p in items}
    expected = ranked(reference_bm25(texts, query))
    got = index.search(query, k=100)
    assert [u for u, _ in got] == [u for u, _ in expected] or _same_up_to_float_ties(got, expected)
    for (u, s), (_, e) in zip(got, expected, strict=True):
        assert s == pytest.approx(e, rel=1e-5), u


def _same_up_to_float_ties(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> bool:
    """Scores that differ by float32 rounding may swap places; compare as rounded groups."""

    def key(hits: list[tuple[str, float]]) -> list[tuple[float, str]]:
        return sorted((-round(s, 4), u) for u, s in hits)

    return key(got) == key(expected)


def _tantivy_reference(
    items: list[tuple[str, dict[str, Any]]], fields: tuple[str, ...], query: str
) -> list[tuple[str, float]]:
    """The same documents in a plain tantivy index, queried through tantivy's own parser."""
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("uid", stored=True, tokenizer_name="raw")
    for f in fields:
        builder.add_text_field(f, tokenizer_name="default")
    index = tantivy.Index(builder.build())
    writer = index.writer(heap_size=15_000_000, num_threads=1)
    for u, props in items:
        doc = tantivy.Document()
        doc.add_text("uid", u)
        for f in fields:
            value = props.get(f)
            for text in [value] if isinstance(value, str) else value or []:
                doc.add_text(f, text)
        writer.add_document(doc)
    writer.commit()
    writer.wait_merging_threads()
    index.reload()
    searcher = index.searcher()
    hits = searcher.search(index.parse_query(query, list(fields)), limit=1000).hits
    return ranked({str(searcher.doc(a).get_first("uid")): float(s) for s, a in hits})


@pytest.mark.parametrize("query", ["apple", "banana cherry", "fig grape honey", "date jam"])
def test_multi_field_matches_tantivy_parser(query: str) -> None:
    fields = ("title", "body")
    items = corpus(60, seed=2, fields=fields)
    items[3][1]["body"] = ["apple pie", "banana split"]  # a text[] value: one value per element
    got = build(items, fields).search(query, k=1000)
    assert got == _tantivy_reference(items, fields, query)


def test_ties_are_broken_by_uuid() -> None:
    items = [(uid(i), {"body": "same words here"}) for i in reversed(range(50))]
    index = build(items, ("body",))
    got = index.search("words", k=5)
    assert [u for u, _ in got] == [uid(i) for i in range(5)]
    assert len({s for _, s in got}) == 1
    assert [u for u, _ in index.search("words", k=5, allow=lambda u: u > uid(30))] == [
        uid(i) for i in range(31, 36)
    ]


# ------------------------------------------------------------------ writes


def test_upsert_replaces_and_delete_removes() -> None:
    index = build([(uid(1), {"body": "apple"}), (uid(2), {"body": "apple banana"})], ("body",))
    assert index.count() == 2
    index.upsert([(uid(1), {"body": "cherry"})])
    assert [u for u, _ in index.search("apple", 10)] == [uid(1), uid(2)]  # not committed yet
    index.commit()
    assert index.count() == 2
    assert [u for u, _ in index.search("apple", 10)] == [uid(2)]
    assert [u for u, _ in index.search("cherry", 10)] == [uid(1)]
    index.upsert([(uid(3), {"body": "fig"}), (uid(3), {"body": "grape"})])  # last one wins
    index.delete([uid(2), uid(99)])  # unknown uuids are ignored
    index.commit()
    assert index.count() == 2
    assert index.search("apple", 10) == []
    assert index.search("fig", 10) == []
    assert [u for u, _ in index.search("grape", 10)] == [uid(3)]
    index.close()


def test_properties_outside_fields_and_odd_values_are_ignored() -> None:
    index = build(
        [
            (uid(1), {"body": "apple", "other": "banana"}),
            (uid(2), {"body": None, "tags": ["banana", 3, None, "cherry"]}),
            (uid(3), {"body": 42}),
            (uid(4), {}),
            (uid(5), {"tags": np.array(["kiwi", "lime"], dtype=object)}),
            (uid(6), {"tags": {"mango": 1}, "body": b"mango"}),
        ],
        ("body", "tags"),
    )
    assert index.count() == 6
    assert [u for u, _ in index.search("lime", 10)] == [uid(5)]
    assert index.search("mango", 10) == []
    assert [u for u, _ in index.search("banana", 10)] == [uid(2)]
    assert [u for u, _ in index.search("cherry", 10, fields=["tags"])] == [uid(2)]
    assert index.search("42", 10) == []


def test_reopen_persists_committed_writes(tmp_path: Path) -> None:
    path = tmp_path / "bm25"
    index = build([(uid(1), {"body": "apple"}), (uid(2), {"body": "banana"})], ("body",), path)
    before = index.search("apple banana", 10)
    index.upsert([(uid(3), {"body": "apple"})])  # never committed
    index.close()
    again = Bm25Index(path, ("body",))
    assert again.count() == 2
    assert again.search("apple banana", 10) == before
    again.delete([uid(1)])
    again.commit()
    again.close()
    assert Bm25Index(path, ("body",)).count() == 1


def test_reopen_with_other_fields_is_refused(tmp_path: Path) -> None:
    build([(uid(1), {"body": "apple"})], ("body",), tmp_path).close()
    with pytest.raises(Bm25SchemaMismatch) as info:
        Bm25Index(tmp_path, ("body", "title"))
    assert info.value.code == "internal"


# ------------------------------------------------------------------ queries


@pytest.fixture(scope="module")
def words_index() -> Bm25Index:
    return build(
        [
            (uid(1), {"title": "foo bar", "body": "AND OR NOT to be"}),
            (uid(2), {"title": "title apple", "body": "plain text"}),
            (uid(3), {"title": "apple", "body": "star * and quotes"}),
        ],
        ("title", "body"),
    )


@pytest.mark.parametrize(
    "query",
    [
        'foo:"bar',
        "AND OR (",
        "(",
        ")",
        '"',
        "'",
        "*",
        "?",
        "+",
        "-",
        "!",
        ":",
        "\\",
        "^",
        "~",
        "[1 TO 5]",
        "{a TO b}",
        "apple^10",
        "apple~2",
        "/ap.*/",
        "title:apple",
        "p_title:apple",
        "id:*",
        "NOT apple",
        "-apple",
        "+apple +banana",
        '"apple',
        "a" * 10_000,
        "\x00 apple",
        "日本語 ✨ apple",
        "",
        "   ",
        "IN [apple banana]",
        "apple AND",
        "$ % & # @",
    ],
)
def test_hostile_queries_are_plain_words(words_index: Bm25Index, query: str) -> None:
    got = words_index.search(query, 10)
    terms = set(text_tokens(query))
    expected = {
        u
        for u, props in [
            (uid(1), "foo bar AND OR NOT to be"),
            (uid(2), "title apple plain text"),
            (uid(3), "apple star * and quotes"),
        ]
        if terms & set(text_tokens(props))
    }
    assert {u for u, _ in got} == expected


def test_operators_are_searched_as_words(words_index: Bm25Index) -> None:
    assert [u for u, _ in words_index.search("NOT", 10)] == [uid(1)]
    assert {u for u, _ in words_index.search("and", 10)} == {uid(1), uid(3)}
    # "-apple" is the word apple, not an exclusion
    assert {u for u, _ in words_index.search("-apple", 10)} == {uid(2), uid(3)}


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_no_query_text_raises(words_index: Bm25Index, query: str) -> None:
    hits = words_index.search(query, 5)
    assert len(hits) <= 5


def test_field_restriction(words_index: Bm25Index) -> None:
    assert [u for u, _ in words_index.search("title", 10)] == [uid(2)]
    assert words_index.search("title", 10, fields=["body"]) == []
    assert [u for u, _ in words_index.search("apple", 10, fields=["title"])] == [uid(3), uid(2)]
    assert {u for u, _ in words_index.search("text apple", 10, fields=["body"])} == {uid(2)}
    assert words_index.search("apple", 10, fields=[]) == []
    with pytest.raises(InvalidInput, match="not searchable"):
        words_index.search("apple", 10, fields=["nope"])


def test_terms_are_deduplicated(words_index: Bm25Index) -> None:
    assert words_index.terms("Apple apple, APPLE pie") == ["apple", "pie"]
    assert words_index.search("apple apple", 10) == words_index.search("apple", 10)


def test_k_and_empty_cases(tmp_path: Path) -> None:
    empty = Bm25Index(None, ("body",))
    assert empty.count() == 0
    assert empty.search("apple", 10) == []
    assert Bm25Index(None, ()).search("apple", 10) == []
    index = build([(uid(i), {"body": "apple"}) for i in range(5)], ("body",))
    assert index.search("apple", 0) == []
    assert index.search("apple", -1) == []
    assert len(index.search("apple", 3)) == 3
    assert len(index.search("apple", 50)) == 5


# ------------------------------------------------------------------ allow-filter


@pytest.fixture(scope="module")
def big_index() -> tuple[Bm25Index, dict[str, float]]:
    rng = random.Random(7)
    items = [
        (uid(i), {"body": " ".join(["common"] * rng.randint(1, 9) + ["x"] * rng.randint(0, 20))})
        for i in range(600)
    ]
    index = build(items, ("body",))
    return index, dict(index.search("common", 10_000))


@pytest.mark.parametrize(
    ("modulus", "k"), [(1, 10), (7, 10), (37, 10), (101, 10), (300, 5), (1000, 10), (3, 150)]
)
def test_allow_filter_returns_top_k_allowed(
    big_index: tuple[Bm25Index, dict[str, float]], modulus: int, k: int
) -> None:
    index, all_scores = big_index
    allowed = {uid(i) for i in range(0, 600, modulus)}
    calls: list[str] = []

    def allow(u: str) -> bool:
        calls.append(u)
        return u in allowed

    got = index.search("common", k, allow=allow)
    expected = ranked({u: s for u, s in all_scores.items() if u in allowed})[:k]
    assert got == expected
    assert len(calls) == len(set(calls))  # each hit is asked once


def test_allow_nothing(big_index: tuple[Bm25Index, dict[str, float]]) -> None:
    index, _ = big_index
    assert index.search("common", 10, allow=lambda u: False) == []


def test_allow_filter_after_deletes() -> None:
    items = [(uid(i), {"body": " ".join(["common"] * (1 + i % 5))}) for i in range(120)]
    index = build(items, ("body",))
    index.delete([uid(i) for i in range(0, 120, 2)])
    index.commit()
    assert index.count() == 60
    got = index.search("common", 7, allow=lambda u: int(u[-4:], 16) % 3 == 0)
    assert len(got) == 7
    assert all(int(u[-4:], 16) % 2 == 1 and int(u[-4:], 16) % 3 == 0 for u, _ in got)
    assert got == sorted(got, key=lambda h: (-h[1], h[0]))
