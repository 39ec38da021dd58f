"""``text2colbert-jinaai``: Jina AI's multi-vector embedding API (``jina-colbert-v2``).

Wire format (as Jina documents it; sources in docs/vectorizers.md)::

    POST {base_url}/v1/multi-vector
    Authorization: Bearer <api key>
    {"model": "jina-colbert-v2", "input_type": "document" | "query", "dimensions": 128,
     "embedding_type": "float", "input": ["text", ...]}

    200 {"model": ..., "object": "list", "usage": {"total_tokens": n},
         "data": [{"object": "embeddings", "index": 0, "embeddings": [[...], ...]}, ...]}
    4xx/5xx {"detail": "message"}

Documents are truncated by Jina at 8192 tokens; queries at 32 tokens, and a query always comes
back as 32 rows (ColBERT query augmentation happens server side).

Errors, after mapping (all raised ``from`` the original exception where there is one)::

    no API key, 401, 403          -> Unauthorized   (message names Jina AI and how to pass a key)
    400, 413, 422                 -> InvalidInput   (Jina's own detail message)
    429, 5xx, connection errors   -> retried with exponential backoff and jitter, honouring
                                     Retry-After; when retries run out -> Unavailable
    timeouts                      -> retried likewise; when retries run out -> DeadlineExceeded
    other statuses, malformed JSON, wrong count / shape / dim, NaN -> InternalError
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from cluster.errors import (
    ColshardError,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    Unauthorized,
    Unavailable,
)
from cluster.types import F32, l2_normalize
from coordinator.vectorizers.base import JINA_KIND, Options

DEFAULT_BASE_URL = "https://api.jina.ai"
DEFAULT_MODEL = "jina-colbert-v2"
ENDPOINT = "/v1/multi-vector"
API_KEY_ENV = "JINAAI_APIKEY"
API_KEY_HEADER = "X-Jina-Api-Key"  # the colshard request header the gateway forwards
COLBERT_V2_DIMENSIONS = (128, 96, 64)
OPTIONS = (
    "model",
    "dimensions",
    "base_url",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "max_backoff_s",
    "max_retry_after_s",
    "batch_size",
)
_INPUT_STATUSES = frozenset({400, 413, 422})


class JinaColbertVectorizer:
    """Client for ``POST /v1/multi-vector``; plain class, picklable (options + key).

    Options: ``model`` (default ``jina-colbert-v2``), ``dimensions`` (128, 96 or 64 for
    jina-colbert-v2; default 128), ``base_url`` (default ``https://api.jina.ai``; tests point it
    at a local server), ``timeout_s`` (per HTTP request, default 30), ``max_retries`` (default 4),
    ``backoff_s`` / ``max_backoff_s`` (first and largest backoff delay, default 0.5 / 8),
    ``max_retry_after_s`` (a Retry-After longer than this is not waited for: fail now, default
    60), ``batch_size`` (texts per request, default 32).

    ``api_key``: the key the caller forwarded (``X-Jina-Api-Key``); else ``$JINAAI_APIKEY``.
    A missing key is reported when a request is due, so ``dim`` is usable without one.
    ``transport`` and ``sleep`` are test seams (an httpx transport; the backoff sleeper).
    """

    def __init__(
        self,
        options: Mapping[str, Any] | None = None,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._options = dict(options or {})
        opts = Options(JINA_KIND, self._options, OPTIONS)
        self.model = opts.get_str("model", DEFAULT_MODEL)
        self.dim = opts.get_int("dimensions", 128, hi=4096)
        if self.model == DEFAULT_MODEL and self.dim not in COLBERT_V2_DIMENSIONS:
            raise opts.bad("dimensions", f"one of {list(COLBERT_V2_DIMENSIONS)} for {self.model}")
        self.base_url = opts.get_str("base_url", DEFAULT_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise opts.bad("base_url", "an http(s) URL")
        self.timeout_s = opts.get_float("timeout_s", 30.0, lo=0.001)
        self.max_retries = opts.get_int("max_retries", 4, lo=0, hi=10)
        self.backoff_s = opts.get_float("backoff_s", 0.5)
        self.max_backoff_s = opts.get_float("max_backoff_s", 8.0)
        self.max_retry_after_s = opts.get_float("max_retry_after_s", 60.0)
        self.batch_size = opts.get_int("batch_size", 32, hi=2048)
        self._api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self._sleep = sleep
        self._random = random.Random()
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=self.timeout_s,
            transport=transport,
            headers={"User-Agent": "colshard", "Accept": "application/json"},
        )
        self.total_tokens = 0  # usage.total_tokens summed over successful requests

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._options, self._api_key))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> JinaColbertVectorizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- encoding ---------------------------------------------------------------------------

    def encode_documents(self, texts: Sequence[str]) -> list[F32]:
        out: list[F32] = []
        for start in range(0, len(texts), self.batch_size):
            out.extend(self._embed(list(texts[start : start + self.batch_size]), "document"))
        return out

    def encode_query(self, text: str) -> F32:
        return self._embed([text], "query")[0]

    def _embed(self, texts: list[str], input_type: str) -> list[F32]:
        payload = {
            "model": self.model,
            "input_type": input_type,
            "dimensions": self.dim,
            "embedding_type": "float",
            "input": texts,
        }
        return self._parse(self._post(payload), len(texts))

    # --- HTTP -------------------------------------------------------------------------------

    def _post(self, payload: dict[str, Any]) -> Any:
        if not self._api_key:
            raise Unauthorized(
                f"Jina AI API key missing: send it in the {API_KEY_HEADER} header "
                f"or set {API_KEY_ENV} on the server",
                {"provider": "jinaai"},
            )
        headers = {"Authorization": f"Bearer {self._api_key}"}
        attempts = self.max_retries + 1
        failure: ColshardError = InternalError("Jina AI request not attempted")
        cause: BaseException | None = None
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            details: dict[str, Any] = {"provider": "jinaai", "attempts": attempt}
            try:
                response = self._client.post(ENDPOINT, json=payload, headers=headers)
            except httpx.TimeoutException as exc:
                failure, cause = (
                    DeadlineExceeded(
                        f"Jina AI API timed out after {self.timeout_s:g} s ({attempt} attempt(s))",
                        details,
                    ),
                    exc,
                )
            except httpx.TransportError as exc:
                failure, cause = (
                    Unavailable(
                        f"Jina AI API unreachable ({type(exc).__name__}: {exc}; "
                        f"{attempt} attempt(s))",
                        details,
                    ),
                    exc,
                )
            else:
                status = response.status_code
                if status == 200:
                    return self._json(response)
                details["status"] = status
                detail = _detail(response)
                if status in (401, 403):
                    raise Unauthorized(
                        f"Jina AI rejected the API key (HTTP {status}): {detail}", details
                    )
                if status in _INPUT_STATUSES:
                    raise InvalidInput(
                        f"Jina AI rejected the request (HTTP {status}): {detail}", details
                    )
                if status != 429 and status < 500:
                    raise InternalError(f"Jina AI answered HTTP {status}: {detail}", details)
                what = "rate limit hit" if status == 429 else f"unavailable (HTTP {status})"
                failure, cause = (
                    Unavailable(
                        f"Jina AI API {what} after {attempt} attempt(s): {detail}", details
                    ),
                    None,
                )
                retry_after = _retry_after_s(response.headers.get("Retry-After"))
            if attempt == attempts:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            if delay > self.max_retry_after_s:
                failure.details["retry_after_s"] = delay
                break
            self._sleep(delay)
        raise failure from cause

    def _backoff(self, attempt: int) -> float:
        # Exponential with jitter, so workers that failed together do not retry together.
        base = min(self.max_backoff_s, self.backoff_s * 2.0 ** (attempt - 1))
        return base * self._random.uniform(0.5, 1.0)

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise InternalError(
                "Jina AI returned a body that is not JSON",
                {"provider": "jinaai", "body": response.text[:200]},
            ) from exc

    def _parse(self, body: Any, n_texts: int) -> list[F32]:
        def bad(why: str) -> InternalError:
            return InternalError(
                f"Jina AI returned a malformed response: {why}", {"provider": "jinaai"}
            )

        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != n_texts:
            raise bad(f"expected 'data' with {n_texts} item(s)")
        usage = body.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            self.total_tokens += usage["total_tokens"]
        out: list[F32 | None] = [None] * n_texts
        for position, item in enumerate(data):
            if not isinstance(item, dict):
                raise bad("a data item is not an object")
            index = item.get("index", position)
            if (
                isinstance(index, bool)
                or not isinstance(index, int)
                or not (0 <= index < n_texts)
                or out[index] is not None
            ):
                raise bad(f"bad or repeated index {index!r}")
            rows = item.get("embeddings", item.get("embedding"))
            try:
                matrix = np.asarray(rows, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise bad(f"item {index}: embeddings are not a numeric matrix") from exc
            if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] != self.dim:
                raise bad(f"item {index}: shape {matrix.shape}, expected (n >= 1, {self.dim})")
            if not np.isfinite(matrix).all():
                raise bad(f"item {index}: NaN or Inf")
            out[index] = l2_normalize(matrix)
        return [m for m in out if m is not None]


def _rebuild(options: dict[str, Any], api_key: str | None) -> JinaColbertVectorizer:
    return JinaColbertVectorizer(options, api_key=api_key)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail)[:500] if detail else response.text[:200]


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110); None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())
