"""Vectorization at the coordinator: objects without vectors at import, and query text.

``Vectorizers`` keeps one client per distinct vectorizer config (kind + options) and batches the
texts of a write. The clients are Ray actors (``VectorizerActor``, created by placement, called
through fanout) in a real cluster, or in-process encoders in unit tests; both satisfy
``VectorizerClient``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from cluster.spec import CollectionSpec, NamedVectorSpec, VectorizerSpec
from cluster.types import F32
from cluster.validation import ObjectInput
from coordinator.vectorizers.base import JINA_KIND, text_for

JINA_KEY = "jinaai"


class VectorizerClient(Protocol):
    async def dim(self, timeout_s: float) -> int: ...
    async def encode_documents(
        self, texts: Sequence[str], api_key: str | None, timeout_s: float
    ) -> list[F32]: ...
    async def encode_query(self, text: str, api_key: str | None, timeout_s: float) -> F32: ...


def vectorizer_key(spec: VectorizerSpec) -> str:
    return json.dumps({"kind": spec.kind, "options": dict(spec.options)}, sort_keys=True)


class Vectorizers:
    def __init__(
        self,
        open_client: Callable[[VectorizerSpec], VectorizerClient],
        timeout_s: float,
        batch_size: int = 64,
    ) -> None:
        self._open_client = open_client
        self._timeout_s = timeout_s
        self._batch_size = batch_size
        self._clients: dict[str, VectorizerClient] = {}

    def _client(self, spec: VectorizerSpec) -> VectorizerClient:
        key = vectorizer_key(spec)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self._open_client(spec)
        return client

    @staticmethod
    def _key_for(spec: VectorizerSpec, api_keys: Mapping[str, str]) -> str | None:
        return api_keys.get(JINA_KEY) if spec.kind == JINA_KIND else None

    async def dim(self, spec: VectorizerSpec) -> int:
        return await self._client(spec).dim(self._timeout_s)

    async def documents(
        self,
        spec: CollectionSpec,
        vectors: Sequence[NamedVectorSpec],
        objects: Sequence[ObjectInput],
        api_keys: Mapping[str, str],
    ) -> dict[str, list[F32 | None]]:
        """Per named vector: an encoding for each object that lacks that vector, else None."""
        out: dict[str, list[F32 | None]] = {}
        for vec in vectors:
            missing = [i for i, o in enumerate(objects) if o.vectors.get(vec.name) is None]
            column: list[F32 | None] = [None] * len(objects)
            await self._encode_into(column, vec, objects, missing, api_keys)
            out[vec.name] = column
        return out

    async def _encode_into(
        self,
        column: list[F32 | None],
        vec: NamedVectorSpec,
        objects: Sequence[ObjectInput],
        missing: Sequence[int],
        api_keys: Mapping[str, str],
    ) -> None:
        """Encode ``objects[i]`` for every i in ``missing`` into ``column[i]``: batches go to
        the client's pool in parallel, at most one in flight per encoder actor."""
        client = self._client(vec.vectorizer)
        key = self._key_for(vec.vectorizer, api_keys)
        slots = asyncio.Semaphore(max(1, int(getattr(client, "parallelism", 1))))

        async def encode(chunk: Sequence[int]) -> None:
            texts = [
                text_for(objects[i].properties, vec.vectorizer.source_properties) for i in chunk
            ]
            async with slots:
                encoded = await client.encode_documents(texts, key, self._timeout_s)
            for i, matrix in zip(chunk, encoded, strict=True):
                column[i] = matrix

        await asyncio.gather(
            *(
                encode(missing[start : start + self._batch_size])
                for start in range(0, len(missing), self._batch_size)
            )
        )

    async def query(self, vec: NamedVectorSpec, text: str, api_keys: Mapping[str, str]) -> F32:
        client = self._client(vec.vectorizer)
        return await client.encode_query(
            text, self._key_for(vec.vectorizer, api_keys), self._timeout_s
        )
