"""Property filters: one small language, parsed by the coordinator, evaluated in shards.

Wire form (JSON)
----------------
A filter is a tree. A *condition* (leaf) tests one property::

    {"path": "year", "operator": "greater_than", "value": 2000}

a *logical* node combines filters::

    {"operator": "and", "operands": [<filter>, ...]}   # one or more operands
    {"operator": "or",  "operands": [<filter>, ...]}   # one or more operands
    {"operator": "not", "operands": [<filter>]}        # exactly one operand

Example — articles from this century that mention wine or cheese, not by an unknown author::

    {"operator": "and", "operands": [
        {"path": "published", "operator": "greater_than_equal", "value": "2000-01-01T00:00:00Z"},
        {"path": "body", "operator": "contains_any", "value": ["wine", "cheese"]},
        {"operator": "not", "operands": [
            {"path": "author", "operator": "is_null", "value": true}]}]}

Keys are exact: unknown keys, unknown operators, wrong value types, properties that are not
filterable, unknown properties and trees deeper than ``max_depth`` (a lone condition is depth 1)
are rejected by :func:`parse_filter` — ``NotFound`` for an unknown property, ``InvalidInput``
for everything else; ``details["at"]`` locates the node (``filters.operands[1]``).

Operators × data types (✓ allowed)::

                        text  text[]  int  number  boolean  date  uuid   value
    equal, not_equal     ✓     ✓      ✓     ✓       ✓       ✓     ✓    one value
    less_than[_equal],   ✓     ✓      ✓     ✓               ✓     ✓    one value
    greater_than[_equal]
    like                 ✓     ✓                                         pattern string
    contains_any/_all    ✓     ✓      ✓     ✓       ✓       ✓     ✓    non-empty list
    is_null              ✓     ✓      ✓     ✓       ✓       ✓     ✓    true | false

Values: text → string; int → integer in int64 range (not a float, not a bool); number → finite
int or float; boolean → true/false; date → RFC 3339 date-time with a timezone offset
(``2021-03-04T05:06:07Z``, ``...+02:00``, fractions allowed), compared as instants at microsecond
precision; uuid → any UUID spelling, compared in canonical lower-case form (ordering is
lexicographic on that form). ``text[]`` takes the element type (a string) except for
contains_*.

Semantics:

- ``text``: equal/comparisons are exact, case-sensitive code-point comparisons of the whole
  string. ``like`` matches the whole string (anchored), case-sensitive, ``*`` = any run of
  characters, ``?`` = exactly one. ``contains_any``/``contains_all`` compare *word tokens*: the
  property and the values are split into lower-cased alphanumeric runs (the tokenisation the BM25
  index uses), so ``{"path": "body", "operator": "contains_all", "value": ["Red wine"]}`` needs
  both ``red`` and ``wine`` among the body's tokens.
- ``text[]``: equal / comparisons / like hold when *some* element satisfies them (so
  not_equal means *no* element equals); contains_any holds when some value equals some element,
  contains_all when every value equals some element (exact, case-sensitive).
- scalar types: contains_any means "is one of"; contains_all holds when every value equals the
  property's value.

Null: a missing property, ``None``, a float NaN, an empty ``text[]`` and a stored value of the
wrong type (unparseable date, string in an int column) are all *null*. Every positive operator
(equal, comparisons, like, contains_*) is false on null. ``not_equal`` is exactly
``not equal``, so it is *true* on null, and ``not`` is plain two-valued negation
(``not (year > 2000)`` includes objects without a year). ``is_null: true`` selects nulls,
``is_null: false`` the rest.

``Filter`` objects are frozen dataclasses (picklable: they cross Ray actor boundaries). Build
them with :func:`parse_filter`; ``to_dict()`` gives the wire form back and
``parse_filter(f.to_dict(), spec) == f``. ``matches`` evaluates one object's properties;
``mask`` evaluates columns (lists or numpy arrays; vectorised for int/float numpy columns, NaN =
null) and agrees with ``matches``. Stored values are read leniently (a naive or date-only date is
UTC, numpy scalars are fine); only filter values are validated strictly.
"""

from __future__ import annotations

import math
import numbers
import re
import uuid as uuid_mod
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal, cast, get_args

import numpy as np
import numpy.typing as npt

from cluster.errors import InvalidInput, NotFound
from cluster.spec import CollectionSpec, DataType, PropertySpec

Bools = npt.NDArray[np.bool_]
Column = Sequence[Any] | npt.NDArray[Any]  # one property's values, one per row

ConditionOperator = Literal[
    "equal",
    "not_equal",
    "less_than",
    "less_than_equal",
    "greater_than",
    "greater_than_equal",
    "like",
    "contains_any",
    "contains_all",
    "is_null",
]
LogicalOperator = Literal["and", "or", "not"]
CONDITION_OPERATORS: Final[tuple[str, ...]] = get_args(ConditionOperator)
LOGICAL_OPERATORS: Final[tuple[str, ...]] = get_args(LogicalOperator)
OPERATORS: Final[tuple[str, ...]] = CONDITION_OPERATORS + LOGICAL_OPERATORS
DEFAULT_MAX_DEPTH: Final = 16

_ORDERED = ("less_than", "less_than_equal", "greater_than", "greater_than_equal")
_CONTAINS = ("contains_any", "contains_all")
_UNORDERED_TYPES = ("boolean",)
_LIKE_TYPES = ("text", "text[]")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_WORD = re.compile(r"[^\W_]+")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def text_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric runs: the word tokenisation shared with the BM25 index."""
    return [t.lower() for t in _WORD.findall(text)]


# --------------------------------------------------------------------------- values


def _instant(value: Any) -> int | None:
    """Microseconds since the epoch (UTC) of a stored date value; None when it is not one.

    Stored values are read leniently (naive → UTC, date-only → midnight); filter values are
    checked strictly by the parser before they get here.
    """
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            return None
        return int(value.astype("datetime64[us]").astype(np.int64))
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int((value - _EPOCH) // _ONE_US)


def _canonical_uuid(value: Any) -> str | None:
    if isinstance(value, uuid_mod.UUID):
        return str(value)
    if not isinstance(value, str):
        return None
    try:
        return str(uuid_mod.UUID(value))
    except ValueError:
        return value.lower()  # not a UUID: still comparable, never equal to a valid one


def _coerce(data_type: str, value: Any) -> Any:
    """One stored scalar as the comparable key for its type; None means null."""
    if value is None:
        return None
    if data_type == "text":
        return value if isinstance(value, str) else None
    if data_type in ("int", "number"):
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            return None
        if isinstance(value, np.generic):
            value = value.item()  # compare the stored value exactly, not in its numpy dtype
        return None if value != value else value  # NaN is null
    if data_type == "boolean":
        return bool(value) if isinstance(value, bool | np.bool_) else None
    if data_type == "date":
        return _instant(value)
    if data_type == "uuid":
        return _canonical_uuid(value)
    return None


def _elements(data_type: str, value: Any) -> tuple[Any, ...]:
    """The stored value as a tuple of comparable keys: () is null, scalars give one key."""
    if data_type == "text[]":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, Sequence | np.ndarray):
            return tuple(v for v in value if isinstance(v, str))
        return ()
    key = _coerce(data_type, value)
    return () if key is None else (key,)


def _exact(kind: str, operand: Any) -> bool:
    """Whether numpy compares a ``kind`` column with ``operand`` as exactly as Python does
    (int64 vs float, or float64 vs a huge int, would round)."""
    values = operand if isinstance(operand, frozenset) else (operand,)
    if kind == "i":
        return all(isinstance(v, int) for v in values)
    return all(isinstance(v, float) or abs(v) <= 2**53 for v in values)


def _like_regex(pattern: str) -> re.Pattern[str]:
    """Anchored wildcard pattern → regex that cannot backtrack catastrophically.

    The text between stars is found at its *earliest* position and committed to (atomic
    group), which is what the classic greedy wildcard matcher does and is always right; only
    the last piece must end the string. Cost is O(len(text) · len(pattern)) whatever the stars.
    """

    def piece(text: str) -> str:
        return "".join("." if ch == "?" else re.escape(ch) for ch in text)

    parts = pattern.split("*")
    if len(parts) == 1:
        return re.compile(piece(pattern), re.DOTALL)
    middles = "".join(f"(?>.*?{piece(p)})" for p in parts[1:-1] if p)
    return re.compile(f"{piece(parts[0])}{middles}.*{piece(parts[-1])}", re.DOTALL)


# --------------------------------------------------------------------------- filter tree


class Filter(ABC):
    """A parsed, validated filter. Immutable and picklable."""

    @abstractmethod
    def matches(self, properties: Mapping[str, Any]) -> bool:
        """Whether an object with these properties passes (a missing property is null)."""

    @abstractmethod
    def mask(self, columns: Mapping[str, Column], n: int) -> Bools:
        """Row-wise ``matches`` over ``n`` rows given as columns (a missing column is null)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The wire form (JSON-ready)."""

    @abstractmethod
    def paths(self) -> frozenset[str]:
        """Property names this filter reads (the columns ``mask`` needs)."""


@dataclass(frozen=True)
class Condition(Filter):
    """A leaf: ``operator`` applied to property ``path`` of type ``data_type``.

    ``value`` is the validated wire value (a tuple for contains_*); the comparison operand is
    derived from it once.
    """

    path: str
    operator: ConditionOperator
    data_type: DataType
    value: Any
    _operand: Any = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_operand", self._make_operand())

    def _make_operand(self) -> Any:
        op, dt, value = self.operator, self.data_type, self.value
        elem = "text" if dt == "text[]" else dt
        if op == "is_null":
            return bool(value)
        if op == "like":
            return _like_regex(value)
        if op in _CONTAINS:
            if dt == "text":
                return frozenset(t for v in value for t in text_tokens(v))
            return frozenset(_coerce(elem, v) for v in value)
        return _coerce(elem, value)

    def _test(self, items: tuple[Any, ...]) -> bool:
        """The positive test on non-null elements (``items`` is never empty here)."""
        op, operand = self.operator, self._operand
        if op == "equal":
            return any(x == operand for x in items)
        if op == "not_equal":
            return not any(x == operand for x in items)
        if op == "less_than":
            return any(x < operand for x in items)
        if op == "less_than_equal":
            return any(x <= operand for x in items)
        if op == "greater_than":
            return any(x > operand for x in items)
        if op == "greater_than_equal":
            return any(x >= operand for x in items)
        if op == "like":
            return any(operand.fullmatch(x) is not None for x in items)
        present: set[Any] = (
            {t for x in items for t in text_tokens(x)} if self.data_type == "text" else set(items)
        )
        if op == "contains_any":
            return not operand.isdisjoint(present)
        return bool(operand <= present)  # contains_all

    def _eval(self, value: Any) -> bool:
        items = _elements(self.data_type, value)
        if self.operator == "is_null":
            return (not items) is self._operand
        if not items:
            return self.operator == "not_equal"
        return self._test(items)

    def matches(self, properties: Mapping[str, Any]) -> bool:
        return self._eval(properties.get(self.path))

    def mask(self, columns: Mapping[str, Column], n: int) -> Bools:
        column = columns.get(self.path)
        if column is None:
            return np.full(n, self._eval(None), dtype=np.bool_)
        if len(column) != n:
            raise ValueError(f"column {self.path!r} has {len(column)} rows, expected {n}")
        if isinstance(column, np.ndarray) and column.ndim == 1:
            fast = self._numeric_mask(column)
            if fast is not None:
                return fast
        return np.fromiter((self._eval(v) for v in column), dtype=np.bool_, count=n)

    def _numeric_mask(self, column: npt.NDArray[Any]) -> Bools | None:
        """Vectorised path for int/float numpy columns (NaN is null); None = not applicable."""
        if self.data_type not in ("int", "number") or column.dtype.kind not in "if":
            return None
        op, operand = self.operator, self._operand
        if op != "is_null" and not _exact(column.dtype.kind, operand):
            return None
        if column.dtype.kind == "f":
            column = column.astype(np.float64, copy=False)
            null = np.isnan(column)
        else:
            column = column.astype(np.int64, copy=False)
            null = np.zeros(len(column), np.bool_)
        with np.errstate(invalid="ignore"):
            if op == "is_null":
                out = null if operand else ~null
            elif op in ("equal", "not_equal"):
                out = (column == operand) & ~null
                out = ~out if op == "not_equal" else out
            elif op == "less_than":
                out = column < operand
            elif op == "less_than_equal":
                out = column <= operand
            elif op == "greater_than":
                out = column > operand
            elif op == "greater_than_equal":
                out = column >= operand
            elif op == "contains_any":
                out = np.isin(column, np.array(sorted(operand))) & ~null
            elif op == "contains_all":
                out = (
                    (column == next(iter(operand))) & ~null
                    if len(operand) == 1
                    else np.zeros(len(column), np.bool_)
                )
            else:
                return None
        return np.asarray(out, dtype=np.bool_)

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"path": self.path, "operator": self.operator, "value": value}

    def paths(self) -> frozenset[str]:
        return frozenset((self.path,))


@dataclass(frozen=True)
class And(Filter):
    operands: tuple[Filter, ...]

    def matches(self, properties: Mapping[str, Any]) -> bool:
        return all(f.matches(properties) for f in self.operands)

    def mask(self, columns: Mapping[str, Column], n: int) -> Bools:
        out = np.ones(n, dtype=np.bool_)
        for f in self.operands:
            out &= f.mask(columns, n)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"operator": "and", "operands": [f.to_dict() for f in self.operands]}

    def paths(self) -> frozenset[str]:
        return frozenset().union(*(f.paths() for f in self.operands))


@dataclass(frozen=True)
class Or(Filter):
    operands: tuple[Filter, ...]

    def matches(self, properties: Mapping[str, Any]) -> bool:
        return any(f.matches(properties) for f in self.operands)

    def mask(self, columns: Mapping[str, Column], n: int) -> Bools:
        out = np.zeros(n, dtype=np.bool_)
        for f in self.operands:
            out |= f.mask(columns, n)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"operator": "or", "operands": [f.to_dict() for f in self.operands]}

    def paths(self) -> frozenset[str]:
        return frozenset().union(*(f.paths() for f in self.operands))


@dataclass(frozen=True)
class Not(Filter):
    operand: Filter

    def matches(self, properties: Mapping[str, Any]) -> bool:
        return not self.operand.matches(properties)

    def mask(self, columns: Mapping[str, Column], n: int) -> Bools:
        return ~self.operand.mask(columns, n)

    def to_dict(self) -> dict[str, Any]:
        return {"operator": "not", "operands": [self.operand.to_dict()]}

    def paths(self) -> frozenset[str]:
        return self.operand.paths()


# --------------------------------------------------------------------------- parsing


def parse_filter(raw: Any, spec: CollectionSpec, max_depth: int = DEFAULT_MAX_DEPTH) -> Filter:
    """Validate a wire filter against ``spec`` (see the module docstring for the language).

    Raises ``NotFound`` for an unknown property and ``InvalidInput`` for anything else that is
    wrong; ``details["at"]`` locates the offending node (``filters.operands[1]``).
    """
    return _parse(raw, spec, max_depth, 1, "filters")


def _fail(at: str, message: str, **details: Any) -> InvalidInput:
    return InvalidInput(f"{at}: {message}", {"at": at, **details})


def _parse(raw: Any, spec: CollectionSpec, max_depth: int, depth: int, at: str) -> Filter:
    if depth > max_depth:
        raise _fail(at, f"filter nested deeper than {max_depth} levels", max_depth=max_depth)
    if not isinstance(raw, Mapping):
        raise _fail(at, f"a filter must be an object, got {type(raw).__name__}")
    op = raw.get("operator")
    if not isinstance(op, str) or op not in OPERATORS:
        raise _fail(
            at, f"unknown operator {op!r}; expected one of {list(OPERATORS)}", operator=repr(op)
        )
    if op in LOGICAL_OPERATORS:
        _check_keys(raw, {"operator", "operands"}, at)
        operands = raw.get("operands")
        if not isinstance(operands, list) or not operands:
            raise _fail(at, f"{op!r} needs 'operands': a non-empty list of filters")
        if op == "not" and len(operands) != 1:
            raise _fail(at, f"'not' takes exactly one operand, got {len(operands)}")
        parsed = tuple(
            _parse(o, spec, max_depth, depth + 1, f"{at}.operands[{i}]")
            for i, o in enumerate(operands)
        )
        if op == "not":
            return Not(parsed[0])
        return And(parsed) if op == "and" else Or(parsed)
    _check_keys(raw, {"path", "operator", "value"}, at)
    path = raw.get("path")
    if not isinstance(path, str):
        raise _fail(at, "a condition needs 'path': the name of a property")
    try:
        prop = spec.property(path)
    except NotFound as exc:
        raise NotFound(f"{at}: {exc.message}", {**exc.details, "at": at}) from None
    if not prop.filterable:
        raise _fail(at, f"property {path!r} is not filterable", property=path)
    if "value" not in raw:
        raise _fail(at, f"operator {op!r} needs a 'value'")
    value = _check_value(cast(ConditionOperator, op), prop, raw["value"], at)
    return Condition(path, cast(ConditionOperator, op), prop.data_type, value)


def _check_keys(raw: Mapping[str, Any], allowed: set[str], at: str) -> None:
    unknown = sorted(str(k) for k in set(raw) - allowed)
    if unknown:
        raise _fail(at, f"unknown key(s) {unknown}; expected {sorted(allowed)}", keys=unknown)


def _check_value(op: ConditionOperator, prop: PropertySpec, value: Any, at: str) -> Any:
    dt = prop.data_type
    if op == "is_null":
        if not isinstance(value, bool):
            raise _fail(at, "is_null takes true or false", property=prop.name)
        return value
    if op in _ORDERED and dt in _UNORDERED_TYPES:
        raise _fail(
            at,
            f"operator {op!r} does not apply to {dt} property {prop.name!r}",
            property=prop.name,
            data_type=dt,
        )
    if op == "like":
        if dt not in _LIKE_TYPES:
            raise _fail(
                at,
                f"'like' applies to text properties only, {prop.name!r} is {dt}",
                property=prop.name,
                data_type=dt,
            )
        if not isinstance(value, str):
            raise _fail(at, "'like' takes a pattern string", property=prop.name)
        return value
    elem = "text" if dt == "text[]" else dt
    if op in _CONTAINS:
        if not isinstance(value, list | tuple) or not value:
            raise _fail(at, f"{op!r} takes a non-empty list of values", property=prop.name)
        values = tuple(_scalar(elem, v, prop.name, at) for v in value)
        if dt == "text" and not any(text_tokens(v) for v in values):
            raise _fail(
                at,
                f"{op!r} on text property {prop.name!r}: the values contain no words to match",
                property=prop.name,
            )
        return values
    return _scalar(elem, value, prop.name, at)


def _scalar(data_type: str, value: Any, prop: str, at: str) -> Any:
    """Validate one filter value for ``data_type``; returns its normalised wire form."""
    ok = False
    expected = data_type
    if data_type == "text":
        ok, expected = isinstance(value, str), "a string"
    elif data_type == "int":
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and _INT64_MIN <= value <= _INT64_MAX
        )
        expected = "an integer in the int64 range"
    elif data_type == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    elif data_type == "boolean":
        ok, expected = isinstance(value, bool), "true or false"
    elif data_type == "date":
        ok = isinstance(value, str) and bool(_RFC3339.match(value)) and _instant(value) is not None
        expected = "an RFC 3339 date-time with a timezone, e.g. 2021-03-04T05:06:07Z"
    elif data_type == "uuid":
        expected = "a UUID string"
        if isinstance(value, str):
            try:
                value = str(uuid_mod.UUID(value))
                ok = True
            except ValueError:
                ok = False
    if not ok:
        raise _fail(
            at,
            f"property {prop!r} is {data_type}: value must be {expected}, got {value!r}",
            property=prop,
            data_type=data_type,
        )
    return value
