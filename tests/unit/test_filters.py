"""cluster.filters: semantics per operator × type, nulls, nesting, validation, mask == matches."""

from __future__ import annotations

import pickle
import re
import time
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.errors import InvalidInput, NotFound
from cluster.filters import And, Condition, Filter, Not, Or, parse_filter, text_tokens
from cluster.spec import CollectionSpec

SPEC = CollectionSpec.from_dict(
    {
        "name": "Docs",
        "properties": [
            {"name": "title", "data_type": "text"},
            {"name": "tags", "data_type": "text[]"},
            {"name": "year", "data_type": "int"},
            {"name": "price", "data_type": "number"},
            {"name": "active", "data_type": "boolean"},
            {"name": "published", "data_type": "date"},
            {"name": "ref", "data_type": "uuid"},
            {"name": "secret", "data_type": "text", "filterable": False},
        ],
        "vectors": [{"name": "v", "kind": "multi", "dim": 4}],
    }
)

U1 = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
U2 = "6ba7b811-9dad-11d1-80b4-00c04fd430c8"

ROW = {
    "title": "Red Wine, and cheese!",
    "tags": ["food", "drink"],
    "year": 2005,
    "price": 12.5,
    "active": True,
    "published": "2021-03-04T05:06:07Z",
    "ref": U1.upper(),
}


def cond(path: str, operator: str, value: Any) -> dict[str, Any]:
    return {"path": path, "operator": operator, "value": value}


def check(raw: dict[str, Any], row: dict[str, Any], expected: bool) -> None:
    f = parse_filter(raw, SPEC)
    assert f.matches(row) is expected, (raw, row)
    cols = {k: [v] for k, v in row.items()}
    assert f.mask(cols, 1).tolist() == [expected]
    assert Not(f).matches(row) is not expected


# ------------------------------------------------------------------ operator × type tables

CASES: list[tuple[str, str, Any, bool]] = [
    # text: exact, case-sensitive whole-string comparisons
    ("title", "equal", "Red Wine, and cheese!", True),
    ("title", "equal", "red wine, and cheese!", False),
    ("title", "not_equal", "Red Wine, and cheese!", False),
    ("title", "not_equal", "other", True),
    ("title", "less_than", "S", True),
    ("title", "less_than", "Red", False),
    ("title", "less_than_equal", "Red Wine, and cheese!", True),
    ("title", "greater_than", "Red", True),
    ("title", "greater_than_equal", "Z", False),
    ("title", "like", "Red*", True),
    ("title", "like", "*cheese?", True),
    ("title", "like", "*cheese", False),  # anchored
    ("title", "like", "red*", False),  # case-sensitive
    ("title", "like", "R?d *", True),
    ("title", "like", "R.d*", False),  # regex characters are literal
    ("title", "like", "*", True),
    # text: contains_* on word tokens, case-insensitive
    ("title", "contains_any", ["beer", "WINE"], True),
    ("title", "contains_any", ["beer", "ale"], False),
    ("title", "contains_all", ["wine", "cheese"], True),
    ("title", "contains_all", ["red wine"], True),  # values are tokenised too
    ("title", "contains_all", ["wine", "beer"], False),
    ("title", "contains_any", ["chee"], False),  # whole tokens only
    # text[]: some element satisfies
    ("tags", "equal", "food", True),
    ("tags", "equal", "Food", False),
    ("tags", "not_equal", "food", False),
    ("tags", "not_equal", "fish", True),
    ("tags", "less_than", "e", True),  # "drink"
    ("tags", "greater_than", "g", False),
    ("tags", "greater_than_equal", "food", True),
    ("tags", "less_than_equal", "a", False),
    ("tags", "like", "dr*", True),
    ("tags", "like", "f??d", True),
    ("tags", "like", "x*", False),
    ("tags", "contains_any", ["fish", "drink"], True),
    ("tags", "contains_any", ["fish", "Drink"], False),
    ("tags", "contains_all", ["drink", "food"], True),
    ("tags", "contains_all", ["drink", "fish"], False),
    # int
    ("year", "equal", 2005, True),
    ("year", "equal", 2006, False),
    ("year", "not_equal", 2006, True),
    ("year", "less_than", 2005, False),
    ("year", "less_than_equal", 2005, True),
    ("year", "greater_than", 2000, True),
    ("year", "greater_than_equal", 2006, False),
    ("year", "contains_any", [1999, 2005], True),
    ("year", "contains_any", [1999], False),
    ("year", "contains_all", [2005, 2005], True),
    ("year", "contains_all", [2005, 2006], False),
    # number (ints accepted as values)
    ("price", "equal", 12.5, True),
    ("price", "not_equal", 12, True),
    ("price", "less_than", 13, True),
    ("price", "less_than_equal", 12.5, True),
    ("price", "greater_than", 12.5, False),
    ("price", "greater_than_equal", 12.4999, True),
    ("price", "contains_any", [1, 12.5], True),
    ("price", "contains_all", [12.5], True),
    # boolean
    ("active", "equal", True, True),
    ("active", "equal", False, False),
    ("active", "not_equal", False, True),
    ("active", "contains_any", [False, True], True),
    ("active", "contains_all", [False, True], False),
    # date: instants, whatever the offset
    ("published", "equal", "2021-03-04T06:06:07+01:00", True),
    ("published", "equal", "2021-03-04T05:06:07.000Z", True),
    ("published", "not_equal", "2021-03-04T05:06:07Z", False),
    ("published", "less_than", "2021-03-04T05:06:08Z", True),
    ("published", "less_than", "2021-03-04T06:06:07+02:00", False),  # 04:06:07Z
    ("published", "less_than_equal", "2021-03-04T05:06:07Z", True),
    ("published", "greater_than", "2021-03-04T00:06:07-05:00", False),  # 05:06:07Z
    ("published", "greater_than", "2021-03-04T00:00:00-04:00", True),  # 04:00:00Z
    ("published", "greater_than_equal", "2021-03-04T05:06:07.000001Z", False),
    ("published", "contains_any", ["2020-01-01T00:00:00Z", "2021-03-04T05:06:07Z"], True),
    ("published", "contains_all", ["2020-01-01T00:00:00Z"], False),
    # uuid: canonical lower-case form
    ("ref", "equal", U1, True),
    ("ref", "equal", U1.replace("-", ""), True),
    ("ref", "equal", U2, False),
    ("ref", "not_equal", U2, True),
    ("ref", "less_than", U2, True),
    ("ref", "greater_than", U2, False),
    ("ref", "less_than_equal", U1, True),
    ("ref", "greater_than_equal", U1.upper(), True),
    ("ref", "contains_any", [U2, U1.upper()], True),
    ("ref", "contains_all", [U2], False),
]


@pytest.mark.parametrize(("path", "operator", "value", "expected"), CASES)
def test_operator_by_type(path: str, operator: str, value: Any, expected: bool) -> None:
    check(cond(path, operator, value), ROW, expected)


NULL_ROWS: list[dict[str, Any]] = [
    {},
    {p: None for p in ROW},
    {
        "tags": [],
        "price": float("nan"),
        "published": "not a date",
        "year": "2005",
        "title": 7,
        "active": "yes",
        "ref": 3,
    },
]
NULL_OPERANDS: dict[str, tuple[Any, Any, Any]] = {
    # path: (scalar value, list value, like pattern or None)
    "title": ("x", ["x"], "*"),
    "tags": ("x", ["x"], "*"),
    "year": (1, [1], None),
    "price": (1.0, [1.0], None),
    "active": (True, [True], None),
    "published": ("2021-03-04T05:06:07Z", ["2021-03-04T05:06:07Z"], None),
    "ref": (U1, [U1], None),
}


@pytest.mark.parametrize("row", NULL_ROWS, ids=["missing", "none", "wrong_type"])
@pytest.mark.parametrize("path", list(NULL_OPERANDS))
def test_null_semantics(row: dict[str, Any], path: str) -> None:
    scalar, values, pattern = NULL_OPERANDS[path]
    check(cond(path, "is_null", True), row, True)
    check(cond(path, "is_null", False), row, False)
    check(cond(path, "equal", scalar), row, False)
    check(cond(path, "not_equal", scalar), row, True)  # not_equal is `not equal`
    check(cond(path, "contains_any", values), row, False)
    check(cond(path, "contains_all", values), row, False)
    if path != "active":
        for op in ("less_than", "less_than_equal", "greater_than", "greater_than_equal"):
            check(cond(path, op, scalar), row, False)
    if pattern is not None:
        check(cond(path, "like", pattern), row, False)


def test_is_null_on_present_values() -> None:
    for path in NULL_OPERANDS:
        check(cond(path, "is_null", False), ROW, True)
        check(cond(path, "is_null", True), ROW, False)


def test_stored_values_are_read_leniently() -> None:
    f = parse_filter(cond("published", "equal", "2021-03-04T00:00:00Z"), SPEC)
    assert f.matches({"published": "2021-03-04"})  # date-only → midnight UTC
    assert f.matches({"published": "2021-03-04T00:00:00"})  # naive → UTC
    assert f.matches({"published": datetime(2021, 3, 4, tzinfo=UTC)})
    assert f.matches({"published": date(2021, 3, 4)})
    assert f.matches({"published": np.datetime64("2021-03-04T00:00:00")})
    assert not f.matches({"published": np.datetime64("NaT")})
    g = parse_filter(cond("tags", "equal", "solo"), SPEC)
    assert g.matches({"tags": "solo"})  # a bare string is a one-element list
    assert g.matches({"tags": np.array(["a", "solo"], dtype=object)})
    assert g.matches({"tags": ["a", None, "solo"]})
    h = parse_filter(cond("year", "equal", 3), SPEC)
    assert h.matches({"year": np.int32(3)}) and h.matches({"year": 3.0})
    assert not h.matches({"year": True})  # a bool is not an int


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab*?", max_size=7), st.text(alphabet="ab\n", max_size=8))
def test_like_agrees_with_plain_wildcard_regex(pattern: str, text: str) -> None:
    naive = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    f = parse_filter(cond("title", "like", pattern), SPEC)
    assert f.matches({"title": text}) is bool(re.fullmatch(naive, text, re.DOTALL))


def test_like_has_no_catastrophic_backtracking() -> None:
    f = parse_filter(cond("title", "like", "*a" * 12 + "*b"), SPEC)
    started = time.perf_counter()
    assert not f.matches({"title": "a" * 20_000})
    assert time.perf_counter() - started < 1.0


def test_text_tokens() -> None:
    assert text_tokens("Héllo, WÖRLD_x 3.14 日本") == ["héllo", "wörld", "x", "3", "14", "日本"]


# ------------------------------------------------------------------ nesting


def test_nesting() -> None:
    raw = {
        "operator": "and",
        "operands": [
            cond("year", "greater_than", 2000),
            {
                "operator": "or",
                "operands": [
                    cond("tags", "contains_any", ["fish"]),
                    {"operator": "not", "operands": [cond("active", "equal", False)]},
                ],
            },
        ],
    }
    f = parse_filter(raw, SPEC)
    assert isinstance(f, And) and isinstance(f.operands[1], Or)
    assert f.matches(ROW)
    assert not f.matches({**ROW, "active": False})
    assert f.matches({**ROW, "active": False, "tags": ["fish"]})
    assert not f.matches({**ROW, "year": 1999})
    assert f.paths() == {"year", "tags", "active"}


def test_single_operand_logic() -> None:
    leaf = cond("year", "equal", 2005)
    assert parse_filter({"operator": "and", "operands": [leaf]}, SPEC).matches(ROW)
    assert parse_filter({"operator": "or", "operands": [leaf]}, SPEC).matches(ROW)


def test_round_trip_and_pickle() -> None:
    raw = {
        "operator": "or",
        "operands": [
            cond("published", "less_than", "2021-03-04T05:06:07.5+01:00"),
            cond("ref", "contains_any", [U1.upper(), U2]),
            {"operator": "not", "operands": [cond("title", "like", "a*b?")]},
            cond("price", "is_null", False),
        ],
    }
    f = parse_filter(raw, SPEC)
    again = parse_filter(f.to_dict(), SPEC)
    assert again == f and hash(again) == hash(f)
    assert f.to_dict()["operands"][0] == raw["operands"][0]  # date string kept as given
    assert f.to_dict()["operands"][1]["value"] == [U1, U2]  # uuid canonicalised
    clone = pickle.loads(pickle.dumps(f))
    assert clone == f
    for row in (ROW, {}, {"title": "axb!"}):
        assert clone.matches(row) == f.matches(row)


def test_filters_are_immutable() -> None:
    f = parse_filter(cond("year", "equal", 1), SPEC)
    assert isinstance(f, Condition)
    with pytest.raises(AttributeError):
        f.value = 2  # type: ignore[misc]


# ------------------------------------------------------------------ validation


def deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = cond("year", "equal", 1)
    for _ in range(levels - 1):
        node = {"operator": "not", "operands": [node]}
    return node


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ([], "must be an object"),
        ({"path": "year", "operator": "bigger", "value": 1}, "unknown operator 'bigger'"),
        ({"path": "year", "value": 1}, "unknown operator None"),
        ({"path": "year", "operator": "equal"}, "needs a 'value'"),
        ({"operator": "equal", "value": 1}, "needs 'path'"),
        ({"path": ["year"], "operator": "equal", "value": 1}, "needs 'path'"),
        ({"path": "year", "operator": "equal", "value": 1, "extra": 0}, "unknown key(s) ['extra']"),
        ({"operator": "and", "operands": []}, "non-empty list"),
        ({"operator": "and", "operands": {}}, "non-empty list"),
        ({"operator": "and"}, "non-empty list"),
        ({"operator": "and", "operands": [cond("year", "equal", 1)], "path": "x"}, "unknown key"),
        ({"operator": "not", "operands": [cond("year", "equal", 1)] * 2}, "exactly one operand"),
        ({"operator": "or", "operands": [cond("year", "equal", 1), 3]}, "operands[1]"),
        (cond("secret", "equal", "x"), "not filterable"),
        (cond("year", "equal", "2005"), "must be an integer"),
        (cond("year", "equal", 2005.0), "must be an integer"),
        (cond("year", "equal", True), "must be an integer"),
        (cond("year", "equal", 2**63), "int64"),
        (cond("year", "equal", None), "must be an integer"),
        (cond("price", "equal", "1"), "finite number"),
        (cond("price", "equal", float("nan")), "finite number"),
        (cond("price", "less_than", float("inf")), "finite number"),
        (cond("price", "equal", False), "finite number"),
        (cond("active", "equal", 1), "true or false"),
        (cond("active", "less_than", True), "does not apply to boolean"),
        (cond("title", "equal", 3), "must be a string"),
        (cond("title", "like", 3), "pattern string"),
        (cond("year", "like", "1*"), "text properties only"),
        (cond("tags", "equal", ["a"]), "must be a string"),
        (cond("tags", "contains_any", "a"), "non-empty list"),
        (cond("tags", "contains_all", []), "non-empty list"),
        (cond("tags", "contains_any", ["a", 1]), "must be a string"),
        (cond("title", "contains_any", ["!!", " "]), "no words"),
        (cond("published", "equal", "2021-03-04"), "RFC 3339"),
        (cond("published", "equal", "2021-03-04T05:06:07"), "RFC 3339"),  # no offset
        (cond("published", "equal", "2021-13-04T05:06:07Z"), "RFC 3339"),
        (cond("published", "equal", 1614834367), "RFC 3339"),
        (cond("ref", "equal", "not-a-uuid"), "UUID"),
        (cond("ref", "contains_any", [U1, 5]), "UUID"),
        (cond("year", "is_null", "yes"), "true or false"),
        (deep(17), "deeper than 16"),
    ],
)
def test_invalid_filters(raw: Any, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_filter(raw, SPEC)
    assert fragment in info.value.message
    assert info.value.details["at"].startswith("filters")


def test_unknown_property_is_not_found() -> None:
    with pytest.raises(NotFound) as info:
        parse_filter({"operator": "not", "operands": [cond("nope", "equal", 1)]}, SPEC)
    assert info.value.details["property"] == "nope"
    assert info.value.details["at"] == "filters.operands[0]"


def test_depth_limit() -> None:
    assert parse_filter(deep(16), SPEC).matches({"year": 2})  # 15 nots around a false leaf
    with pytest.raises(InvalidInput):
        parse_filter(deep(4), SPEC, max_depth=3)
    parse_filter(deep(3), SPEC, max_depth=3)
    with pytest.raises(InvalidInput, match="deeper"):
        parse_filter(deep(10_000), SPEC)  # rejected before recursing far


def test_mask_shapes_and_columns() -> None:
    f = parse_filter(cond("year", "greater_than", 2000), SPEC)
    assert f.mask({}, 3).tolist() == [False] * 3
    assert Not(f).mask({}, 3).tolist() == [True] * 3
    assert f.mask({"year": np.array([1999, 2001, 2005])}, 3).tolist() == [False, True, True]
    assert f.mask({"year": np.array([np.nan, 2001.0])}, 2).tolist() == [False, True]
    assert f.mask({"year": [None, 2001]}, 2).tolist() == [False, True]
    with pytest.raises(ValueError, match="rows"):
        f.mask({"year": [1, 2]}, 3)
    g = parse_filter(cond("price", "equal", 0.1), SPEC)
    col32 = np.array([0.1], dtype=np.float32)
    assert g.mask({"price": col32}, 1).tolist() == [g.matches({"price": col32[0]})] == [False]
    big = parse_filter(cond("year", "equal", 2**53 + 1), SPEC)
    assert big.mask({"year": np.array([2.0**53])}, 1).tolist() == [False]  # no float rounding


# ------------------------------------------------------------------ properties

PATH_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "title": st.text(alphabet="abAB ,", max_size=6),
    "tags": st.lists(st.sampled_from(["a", "b", "ab", "B"]), max_size=3),
    "year": st.integers(-3, 3),
    "price": st.one_of(st.integers(-3, 3), st.sampled_from([-1.5, 0.0, 0.5, 2.25])),
    "active": st.booleans(),
    "published": st.sampled_from(
        [
            "2020-01-01T00:00:00Z",
            "2020-01-01T01:00:00+01:00",
            "2020-01-02T00:00:00Z",
            "1999-12-31T23:59:59.999Z",
        ]
    ),
    "ref": st.sampled_from([U1, U2, U1.upper()]),
}
FILTER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    **PATH_VALUES,
    "title": st.text(alphabet="abAB", min_size=1, max_size=3),
    "tags": st.sampled_from(["a", "b", "ab", "B"]),
}
OPS_BY_PATH = {
    "title": [
        "equal",
        "not_equal",
        "less_than",
        "greater_than_equal",
        "like",
        "contains_any",
        "contains_all",
        "is_null",
    ],
    "tags": [
        "equal",
        "not_equal",
        "less_than_equal",
        "greater_than",
        "like",
        "contains_any",
        "contains_all",
        "is_null",
    ],
    "active": ["equal", "not_equal", "contains_any", "contains_all", "is_null"],
}
NUMERIC_OPS = [
    "equal",
    "not_equal",
    "less_than",
    "less_than_equal",
    "greater_than",
    "greater_than_equal",
    "contains_any",
    "contains_all",
    "is_null",
]


@st.composite
def leaves(draw: st.DrawFn) -> dict[str, Any]:
    path = draw(st.sampled_from(sorted(PATH_VALUES)))
    op = draw(st.sampled_from(OPS_BY_PATH.get(path, NUMERIC_OPS)))
    value: Any
    if op == "is_null":
        value = draw(st.booleans())
    elif op == "like":
        value = draw(st.text(alphabet="ab*?,", max_size=4))
    elif op in ("contains_any", "contains_all"):
        value = draw(st.lists(FILTER_VALUES[path], min_size=1, max_size=3))
    else:
        value = draw(FILTER_VALUES[path])
    return cond(path, op, value)


wire_filters = st.recursive(
    leaves(),
    lambda kids: st.one_of(
        st.builds(
            lambda ops: {"operator": "and", "operands": ops}, st.lists(kids, min_size=1, max_size=3)
        ),
        st.builds(
            lambda ops: {"operator": "or", "operands": ops}, st.lists(kids, min_size=1, max_size=3)
        ),
        st.builds(lambda f: {"operator": "not", "operands": [f]}, kids),
    ),
    max_leaves=6,
)


@st.composite
def tables(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rows whose values may be missing or None."""
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        row: dict[str, Any] = {}
        for path, values in PATH_VALUES.items():
            kind = draw(st.sampled_from(["value", "value", "none", "missing"]))
            if kind == "value":
                row[path] = draw(values)
            elif kind == "none":
                row[path] = None
        rows.append(row)
    return rows


def columns_of(rows: list[dict[str, Any]], numpy: bool) -> dict[str, Any]:
    cols: dict[str, Any] = {p: [r.get(p) for r in rows] for p in PATH_VALUES}
    if numpy:  # numeric numpy columns exercise the vectorised path (NaN = null)
        years = cols["year"]
        if all(y is not None for y in years):
            cols["year"] = np.array(years, dtype=np.int64)
        cols["price"] = np.array(
            [np.nan if p is None else p for p in cols["price"]], dtype=np.float64
        )
    return cols


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(wire_filters, tables(), st.booleans())
def test_mask_agrees_with_matches(
    raw: dict[str, Any], rows: list[dict[str, Any]], numpy: bool
) -> None:
    f = parse_filter(raw, SPEC)
    expected = [f.matches(r) for r in rows]
    assert f.mask(columns_of(rows, numpy), len(rows)).tolist() == expected


@FAST
@given(wire_filters, tables())
def test_not_inverts_and_round_trips(raw: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    f = parse_filter(raw, SPEC)
    neg: Filter = Not(f)
    for r in rows:
        assert neg.matches(r) is not f.matches(r)
    cols = columns_of(rows, numpy=False)
    assert (neg.mask(cols, len(rows)) == ~f.mask(cols, len(rows))).all()
    assert parse_filter(f.to_dict(), SPEC) == f
    assert pickle.loads(pickle.dumps(f)) == f


@FAST
@given(leaves(), tables())
def test_not_equal_is_not_equal(raw: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if raw["operator"] not in ("equal", "not_equal"):
        return
    eq = parse_filter({**raw, "operator": "equal"}, SPEC)
    ne = parse_filter({**raw, "operator": "not_equal"}, SPEC)
    for r in rows:
        assert ne.matches(r) is not eq.matches(r)
