"""The text-vectorizer contract, the factory that builds one from a ``VectorizerSpec``, and the
small helpers both implementations share (option parsing, text assembly, row normalisation).

A vectorizer turns text into ColBERT-style multi-vectors: one L2-normalised float32 row per
token, ``(n_tokens, dim)`` with ``n_tokens >= 1``. Documents and queries are encoded
differently (ColBERT is asymmetric), hence two methods.

Implementations are plain classes constructed from the spec's ``options`` (picklable input), so
a Ray worker can build its own copy; nothing here touches Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cluster.errors import InternalError, InvalidInput, Unavailable
from cluster.spec import VectorizerSpec
from cluster.types import F32

LOCAL_KIND = "text2colbert-local"
JINA_KIND = "text2colbert-jinaai"


@runtime_checkable
class TextVectorizer(Protocol):
    """Text -> multi-vector encoder. ``dim`` is known right after construction."""

    dim: int

    def encode_documents(self, texts: Sequence[str]) -> list[F32]:
        """One ``(n_tokens, dim)`` float32 matrix per text, rows unit-norm, ``n_tokens >= 1``."""
        ...

    def encode_query(self, text: str) -> F32:
        """The query's ``(n_tokens, dim)`` matrix (query-side encoding: markers, expansion)."""
        ...


def make_vectorizer(spec: VectorizerSpec, *, api_key: str | None = None) -> TextVectorizer:
    """Build the vectorizer a named vector declares.

    ``api_key`` is only used by remote providers (Jina: the ``X-Jina-Api-Key`` request header the
    gateway forwards); without it the provider falls back to its environment variable.
    Raises InvalidInput for ``kind="none"``, unknown kinds and bad options.
    """
    # Imports are local so that importing this package never pulls torch / transformers.
    if spec.kind == LOCAL_KIND:
        try:
            from coordinator.vectorizers.local import LocalColbertVectorizer
        except ImportError as exc:
            raise Unavailable(
                f"{LOCAL_KIND} needs torch and transformers on this server "
                f"(install colshard[colbert]): {exc}",
                {"kind": spec.kind},
            ) from exc
        return LocalColbertVectorizer(spec.options)
    if spec.kind == JINA_KIND:
        from coordinator.vectorizers.jina import JinaColbertVectorizer

        return JinaColbertVectorizer(spec.options, api_key=api_key)
    if spec.kind == "none":
        raise InvalidInput(
            "this named vector has no vectorizer (kind 'none'): "
            "provide vectors with the objects and near_vector queries",
            {"kind": spec.kind},
        )
    raise InvalidInput(
        f"unknown vectorizer kind {spec.kind!r}",
        {"kind": spec.kind, "kinds": [LOCAL_KIND, JINA_KIND]},
    )


def text_for(properties: Mapping[str, Any], source_properties: Sequence[str]) -> str:
    """The text a vectorizer embeds for one object.

    Values of ``source_properties`` are joined with single spaces, in the declared order;
    ``text[]`` values contribute their items in order; missing, ``None`` and empty values are
    skipped; numbers and booleans are written with ``str``. With no source properties declared,
    every text-like property (a string or a list of strings) is used, sorted by property name so
    the result does not depend on the order of keys in a request.
    """
    if source_properties:
        names: Sequence[str] = source_properties
    else:
        names = sorted(name for name, value in properties.items() if _is_text_like(value))
    parts: list[str] = []
    for name in names:
        value = properties.get(name)
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if item is None:
                continue
            piece = item if isinstance(item, str) else str(item)
            if piece.strip():
                parts.append(piece.strip())
    return " ".join(parts)


def _is_text_like(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


def check_matrix(arr: F32, dim: int, *, what: str) -> F32:
    """Guard on what an encoder produced: 2-D, ``n >= 1``, right ``dim``, finite."""
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != dim or not np.isfinite(arr).all():
        raise InternalError(
            f"{what}: encoder produced an invalid matrix {tuple(arr.shape)}",
            {"shape": list(arr.shape), "dim": dim},
        )
    return arr


class Options:
    """Typed reading of a vectorizer's ``options`` mapping; every problem is an InvalidInput
    naming the vectorizer kind and the option. Unknown option names are rejected (typos)."""

    def __init__(self, kind: str, raw: Mapping[str, Any], allowed: Sequence[str]) -> None:
        self.kind = kind
        self.raw = dict(raw)
        unknown = sorted(set(self.raw) - set(allowed))
        if unknown:
            raise InvalidInput(
                f"{kind}: unknown option(s) {unknown}; allowed: {sorted(allowed)}",
                {"kind": kind, "options": unknown},
            )

    def bad(self, name: str, expected: str) -> InvalidInput:
        return InvalidInput(
            f"{self.kind}: option {name!r} must be {expected}, got {self.raw.get(name)!r}",
            {"kind": self.kind, "option": name},
        )

    def optional_int(self, name: str, *, lo: int = 1, hi: int | None = None) -> int | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < lo
            or (hi is not None and value > hi)
        ):
            raise self.bad(name, f"an integer in {lo}..{hi if hi is not None else 'inf'}")
        return value

    def get_int(self, name: str, default: int, *, lo: int = 1, hi: int | None = None) -> int:
        value = self.optional_int(name, lo=lo, hi=hi)
        return default if value is None else value

    def get_float(self, name: str, default: float, *, lo: float = 0.0) -> float:
        value = self.raw.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < lo
        ):
            raise self.bad(name, f"a number >= {lo}")
        return float(value)

    def optional_bool(self, name: str) -> bool | None:
        value = self.raw.get(name)
        if value is not None and not isinstance(value, bool):
            raise self.bad(name, "true or false")
        return value

    def optional_str(self, name: str, *, choices: Sequence[str] | None = None) -> str | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if (
            not isinstance(value, str)
            or not value
            or (choices is not None and value not in choices)
        ):
            raise self.bad(name, f"one of {list(choices)}" if choices else "a non-empty string")
        return value

    def get_str(self, name: str, default: str, *, choices: Sequence[str] | None = None) -> str:
        value = self.optional_str(name, choices=choices)
        return default if value is None else value


class VectorizerCache:
    """One vectorizer per API key for one spec, built on first use (remote providers take the
    caller's key per request; local models ignore it, so they load once)."""

    def __init__(self, spec: VectorizerSpec) -> None:
        self.spec = spec
        self._by_key: dict[str | None, TextVectorizer] = {}

    def get(self, api_key: str | None) -> TextVectorizer:
        if api_key not in self._by_key:
            self._by_key[api_key] = make_vectorizer(self.spec, api_key=api_key)
        return self._by_key[api_key]
