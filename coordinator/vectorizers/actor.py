"""``VectorizerActor``: a Ray actor holding one text encoder (the model loads once per actor).

Created by placement (``colshard:vectorizer:<n>``), called through fanout. One encoder per API
key for remote providers, so per-request keys (``X-Jina-Api-Key``) are honoured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cluster.spec import VectorizerSpec
from cluster.types import F32
from coordinator.vectorizers.base import LOCAL_KIND, VectorizerCache


class VectorizerActor:
    def __init__(self, kind: str, options: dict[str, Any]) -> None:
        self._vectorizers = VectorizerCache(VectorizerSpec(kind, (), dict(options)))
        self._encoded = {"documents": 0, "queries": 0}
        if kind == LOCAL_KIND:
            self._get(None)  # load the model now, not on the first request

    def _get(self, api_key: str | None) -> Any:
        return self._vectorizers.get(api_key)

    def dim(self) -> int:
        return int(self._get(None).dim)

    def encode_documents(self, texts: Sequence[str], api_key: str | None) -> list[F32]:
        result: list[F32] = self._get(api_key).encode_documents(list(texts))
        self._encoded["documents"] += len(result)
        return result

    def encode_query(self, text: str, api_key: str | None) -> F32:
        result: F32 = self._get(api_key).encode_query(text)
        self._encoded["queries"] += 1
        return result

    def stats(self) -> dict[str, int]:
        """Texts this actor encoded since it started (documents, queries)."""
        return dict(self._encoded)
