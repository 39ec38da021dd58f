"""text2colbert-jinaai against a real HTTP server on 127.0.0.1 that speaks Jina's documented
multi-vector format and can be scripted to fail (401/403/422/429/5xx, garbage, dropped
connections, slow answers)."""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from cluster.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    Unauthorized,
    Unavailable,
)
from cluster.spec import VectorizerSpec
from coordinator.vectorizers import make_vectorizer
from coordinator.vectorizers.jina import JinaColbertVectorizer, _retry_after_s

KEY = "jina_test_key"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeJina:
    """Scripted behaviour: ``script`` is consumed one entry per request, then ``"ok"``."""

    script: list[Any] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    shuffle: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.script.clear()
            self.requests.clear()
            self.shuffle = False

    def next_action(self) -> Any:
        with self.lock:
            return self.script.pop(0) if self.script else "ok"


def rows_for(text: str, input_type: str, dim: int) -> list[list[float]]:
    """Deterministic, unnormalised token rows: 32 for a query, n_words + 2 for a document."""
    n = 32 if input_type == "query" else len(text.split()) + 2
    seed = int.from_bytes(hashlib.sha256(f"{input_type}:{text}".encode()).digest()[:4], "big")
    return (np.random.default_rng(seed).normal(size=(n, dim)) * 3.0).tolist()  # type: ignore[no-any-return]


def make_handler(fake: FakeJina) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout tests)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = json.loads(raw)
            with fake.lock:
                fake.requests.append(Request(self.path, dict(self.headers.items()), body))
            action = fake.next_action()
            if isinstance(action, tuple):  # (status, headers)
                status, headers = action
                self._send(status, json.dumps({"detail": f"scripted {status}"}).encode(), headers)
                return
            if action == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if action == "slow":
                time.sleep(0.6)
            if action == "garbage":
                self._send(200, b"<html>not json</html>")
                return
            dim = int(body.get("dimensions", 128))
            data = [
                {
                    "object": "embeddings",
                    "index": i,
                    "embeddings": rows_for(text, body["input_type"], dim),
                }
                for i, text in enumerate(body["input"])
            ]
            if action == "wrong_count":
                data = data[:-1]
            elif action == "wrong_dim":
                data[0]["embeddings"] = [[0.1] * (dim + 1)]
            elif action == "ragged":
                data[0]["embeddings"] = [[0.1] * dim, [0.1] * (dim - 1)]
            elif action == "empty_rows":
                data[0]["embeddings"] = []
            elif action == "dup_index":
                data[-1]["index"] = 0
            if fake.shuffle:
                data.reverse()
            n_tokens = sum(len(t.split()) for t in body["input"])
            self._send(
                200,
                json.dumps(
                    {
                        "model": body["model"],
                        "object": "list",
                        "data": data,
                        "usage": {"total_tokens": n_tokens},
                    }
                ).encode(),
            )

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FakeJina]]:
    fake = FakeJina()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def fake(server: tuple[str, FakeJina]) -> FakeJina:
    server[1].reset()
    return server[1]


@pytest.fixture()
def url(server: tuple[str, FakeJina]) -> str:
    return server[0]


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JINAAI_APIKEY", raising=False)


def client(url: str, sleeps: list[float] | None = None, **options: Any) -> JinaColbertVectorizer:
    recorder = sleeps if sleeps is not None else []
    return JinaColbertVectorizer({"base_url": url, **options}, api_key=KEY, sleep=recorder.append)


def assert_unit_rows(matrix: np.ndarray[Any, Any], dim: int) -> None:
    assert matrix.dtype == np.float32 and matrix.ndim == 2 and matrix.shape[1] == dim
    assert matrix.shape[0] >= 1
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


# --- happy path ------------------------------------------------------------------------------


def test_documents_are_batched_and_sent_in_the_documented_format(url: str, fake: FakeJina) -> None:
    texts = ["Weaviate is a vector database", "PyTorch", "a b c", "one two", "last one here"]
    with client(url, batch_size=2) as vec:
        out = vec.encode_documents(texts)
        assert vec.total_tokens == sum(len(t.split()) for t in texts)
    assert [len(r.body["input"]) for r in fake.requests] == [2, 2, 1]
    for request in fake.requests:
        assert request.path == "/v1/multi-vector"
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert request.body["model"] == "jina-colbert-v2"
        assert request.body["input_type"] == "document"
        assert request.body["dimensions"] == 128
        assert request.body["embedding_type"] == "float"
    assert [r.body["input"] for r in fake.requests] == [texts[0:2], texts[2:4], texts[4:]]
    for text, matrix in zip(texts, out, strict=True):
        assert matrix.shape == (len(text.split()) + 2, 128)
        assert_unit_rows(matrix, 128)
        expected = np.asarray(rows_for(text, "document", 128), dtype=np.float32)
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(matrix, expected, atol=1e-6)


def test_results_follow_the_index_field_not_the_response_order(url: str, fake: FakeJina) -> None:
    fake.shuffle = True
    texts = ["first text", "the second text", "third"]
    out = client(url).encode_documents(texts)
    assert [m.shape[0] for m in out] == [4, 5, 3]


def test_query_uses_input_type_query_and_dimensions_option(url: str, fake: FakeJina) -> None:
    vec = client(url, dimensions=64)
    assert vec.dim == 64
    matrix = vec.encode_query("A good database for AI app builders")
    assert matrix.shape == (32, 64)
    assert_unit_rows(matrix, 64)
    (request,) = fake.requests
    assert request.body["input_type"] == "query"
    assert request.body["dimensions"] == 64
    assert request.body["input"] == ["A good database for AI app builders"]


def test_no_texts_no_request(url: str, fake: FakeJina) -> None:
    assert client(url).encode_documents([]) == []
    assert fake.requests == []


def test_key_from_env_and_argument_precedence(
    url: str, fake: FakeJina, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JINAAI_APIKEY", "from-env")
    JinaColbertVectorizer({"base_url": url}).encode_query("q")
    JinaColbertVectorizer({"base_url": url}, api_key="from-header").encode_query("q")
    assert [r.headers["Authorization"] for r in fake.requests] == [
        "Bearer from-env",
        "Bearer from-header",
    ]


def test_make_vectorizer_and_pickling(url: str, fake: FakeJina) -> None:
    spec = VectorizerSpec("text2colbert-jinaai", ("text",), {"base_url": url, "dimensions": 96})
    vec = make_vectorizer(spec, api_key="k2")
    assert isinstance(vec, JinaColbertVectorizer) and vec.dim == 96
    clone = pickle.loads(pickle.dumps(vec))
    assert clone.encode_query("hello").shape == (32, 96)
    assert fake.requests[-1].headers["Authorization"] == "Bearer k2"


# --- errors ------------------------------------------------------------------------------------


def test_missing_key_is_unauthorized_without_a_request(url: str, fake: FakeJina) -> None:
    vec = JinaColbertVectorizer({"base_url": url})
    assert vec.dim == 128  # usable without a key
    with pytest.raises(Unauthorized, match="Jina AI API key missing"):
        vec.encode_documents(["x"])
    assert fake.requests == []


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_key_is_unauthorized_and_not_retried(
    url: str, fake: FakeJina, status: int
) -> None:
    fake.script.append((status, {}))
    with pytest.raises(Unauthorized, match="Jina AI") as info:
        client(url).encode_query("q")
    assert info.value.details["status"] == status
    assert len(fake.requests) == 1


def test_bad_request_is_invalid_input_with_jinas_detail(url: str, fake: FakeJina) -> None:
    fake.script.append((422, {}))
    with pytest.raises(InvalidInput, match="scripted 422"):
        client(url).encode_documents(["x"])
    assert len(fake.requests) == 1


def test_429_is_retried_honouring_retry_after(url: str, fake: FakeJina) -> None:
    fake.script.extend([(429, {"Retry-After": "1.5"}), (429, {"Retry-After": "0"})])
    sleeps: list[float] = []
    out = client(url, sleeps).encode_documents(["a b"])
    assert out[0].shape == (4, 128)
    assert len(fake.requests) == 3
    assert sleeps == [1.5, 0.0]


def test_429_after_all_retries_is_unavailable(url: str, fake: FakeJina) -> None:
    fake.script.extend([(429, {})] * 10)
    sleeps: list[float] = []
    with pytest.raises(Unavailable, match="rate limit") as info:
        client(url, sleeps, max_retries=3, backoff_s=0.2, max_backoff_s=0.5).encode_query("q")
    assert len(fake.requests) == 4
    assert info.value.details["status"] == 429 and info.value.details["attempts"] == 4
    # exponential backoff with jitter in [0.5, 1] x min(max_backoff, backoff * 2^k)
    for delay, base in zip(sleeps, [0.2, 0.4, 0.5], strict=True):
        assert 0.5 * base <= delay <= base


def test_retry_after_longer_than_allowed_fails_fast(url: str, fake: FakeJina) -> None:
    fake.script.append((429, {"Retry-After": "3600"}))
    sleeps: list[float] = []
    with pytest.raises(Unavailable) as info:
        client(url, sleeps).encode_query("q")
    assert len(fake.requests) == 1 and sleeps == []
    assert info.value.details["retry_after_s"] == 3600.0


def test_5xx_is_retried_then_succeeds(url: str, fake: FakeJina) -> None:
    fake.script.extend([(500, {}), (503, {})])
    sleeps: list[float] = []
    assert client(url, sleeps).encode_query("q").shape == (32, 128)
    assert len(fake.requests) == 3 and len(sleeps) == 2


def test_5xx_after_all_retries_is_unavailable(url: str, fake: FakeJina) -> None:
    fake.script.extend([(502, {})] * 10)
    with pytest.raises(Unavailable, match="HTTP 502"):
        client(url, max_retries=2).encode_query("q")
    assert len(fake.requests) == 3


def test_dropped_connection_is_retried(url: str, fake: FakeJina) -> None:
    fake.script.append("drop")
    sleeps: list[float] = []
    assert client(url, sleeps).encode_query("q").shape == (32, 128)
    assert len(fake.requests) == 2 and len(sleeps) == 1


def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps: list[float] = []
    with pytest.raises(Unavailable, match="unreachable"):
        client(f"http://127.0.0.1:{port}", sleeps, max_retries=2).encode_query("q")
    assert len(sleeps) == 2


def test_timeout_is_deadline_exceeded(url: str, fake: FakeJina) -> None:
    fake.script.extend(["slow", "slow"])
    with pytest.raises(DeadlineExceeded, match="timed out"):
        client(url, timeout_s=0.2, max_retries=1).encode_query("q")
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    "action", ["garbage", "wrong_count", "wrong_dim", "ragged", "empty_rows", "dup_index"]
)
def test_malformed_responses_are_internal_errors(url: str, fake: FakeJina, action: str) -> None:
    fake.script.append(action)
    with pytest.raises(InternalError, match="Jina AI returned"):
        client(url).encode_documents(["one two", "three"])
    assert len(fake.requests) == 1  # not retried


@pytest.mark.parametrize(
    "options",
    [
        {"dimensions": 100},
        {"dimensions": "128"},
        {"bogus": 1},
        {"base_url": "api.jina.ai"},
        {"max_retries": -1},
        {"timeout_s": 0},
    ],
)
def test_bad_options_are_invalid_input(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        JinaColbertVectorizer(options, api_key=KEY)


def test_retry_after_parsing() -> None:
    assert _retry_after_s(None) is None
    assert _retry_after_s("garbage") is None
    assert _retry_after_s("2") == 2.0
    assert _retry_after_s("-5") == 0.0
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    parsed = _retry_after_s(future)
    assert parsed is not None and 25 <= parsed <= 31
