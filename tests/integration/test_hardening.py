"""What an attacker or a careless client tries, against a real gateway and coordinator: lone
surrogates, empty query text, too many properties, unresolvable OpenAPI refs, over-limit bodies
from a client that sends before it reads, slow and idle connections, and a shard's pid in
/v1/cluster after Ray restarted it."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Server
from tests.integration.gateways import extra_gateway
from tests.integration.shards import ShardRef

pytestmark = pytest.mark.integration

HEADER_S, BODY_S, IDLE_S = 1.0, 2.0, 1.0


@pytest.fixture(scope="module")
def gateway_url(colshard_server: Server) -> Iterator[str]:
    settings = replace(
        colshard_server.settings,
        http_header_timeout_s=HEADER_S,
        http_body_timeout_s=BODY_S,
        http_idle_timeout_s=IDLE_S,
        max_body_bytes=1024 * 1024,
    )
    with extra_gateway(settings, colshard_server.handle) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post(
                "/v1/collections",
                json={
                    "name": "Hard",
                    "properties": [{"name": "text", "data_type": "text"}],
                    "vectors": [{"name": "mv", "dim": 4}],
                    "shard_count": 1,
                },
            )
            assert r.status_code == 201, r.text
            r = http.post(
                "/v1/collections/Hard/objects",
                json={
                    "objects": [
                        {"properties": {"text": "a nice cat"}, "vectors": {"mv": [[1, 0, 0, 0]]}}
                    ]
                },
            )
            assert r.json()["n_ok"] == 1, r.text
        yield url


def post_raw(url: str, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}{path}", content=raw, timeout=60, headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/collections", b'{"name": "\\ud800", "vectors": [{"name": "v", "dim": 4}]}'),
        (
            "/v1/collections",
            b'{"name": "Sur", "properties": [{"name": "\\ud800", '
            b'"data_type": "text"}], "vectors": [{"name": "v", "dim": 4}]}',
        ),
        ("/v1/collections/Hard/query", b'{"bm25": {"query": "cat \\ud800"}}'),
        ("/v1/collections/Hard/query", b'{"near_text": {"query": "\\udfff x"}}'),
        ("/v1/collections/Hard/query", b'{"hybrid": {"query": "\\ud800"}}'),
        (
            "/v1/collections/Hard/objects",
            b'{"objects": [{"properties": {"text": "\\ud800"}, '
            b'"vectors": {"mv": [[1, 0, 0, 0]]}}]}',
        ),
        (
            "/v1/collections/Hard/objects/delete",
            b'{"filters": {"path": "text", "operator": "equal", "value": "\\ud800"}}',
        ),
    ],
)
def test_lone_surrogates_are_400_everywhere(gateway_url: str, path: str, raw: bytes) -> None:
    r = post_raw(gateway_url, path, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"
    names = [c["name"] for c in httpx.get(f"{gateway_url}/v1/collections").json()["collections"]]
    assert "Sur" not in names


@pytest.mark.parametrize(
    "body",
    [{"near_text": {"query": ""}}, {"near_text": {"query": "   "}}, {"hybrid": {"query": ""}}],
)
def test_empty_query_text_is_422(gateway_url: str, body: dict[str, Any]) -> None:
    r = httpx.post(f"{gateway_url}/v1/collections/Hard/query", json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert "empty" in r.json()["error"]["message"]


def test_too_many_properties_or_vectors_is_422(colshard_server: Server) -> None:
    props = [{"name": f"p{i}", "data_type": "text"} for i in range(30_000)]
    r = httpx.post(
        f"{colshard_server.url}/v1/collections",
        timeout=60,
        json={"name": "Wide", "properties": props, "vectors": [{"name": "v", "dim": 4}]},
    )
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"]["details"]["limit"] == "max_properties"
    r = httpx.post(
        f"{colshard_server.url}/v1/collections",
        timeout=60,
        json={"name": "Wide", "vectors": [{"name": f"v{i}", "dim": 4} for i in range(65)]},
    )
    assert r.status_code == 422 and r.json()["error"]["details"]["limit"] == "max_vectors"
    assert httpx.get(f"{colshard_server.url}/v1/collections/Wide").status_code == 404


def test_every_openapi_ref_resolves(gateway_url: str) -> None:
    schema = httpx.get(f"{gateway_url}/openapi.json").json()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    refs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert "#/components/schemas/BatchIn" in refs
    for ref in refs:
        target: Any = schema
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, f"{ref} does not resolve"
            target = target[part]


def test_an_over_limit_body_reaches_a_simple_client_as_413(gateway_url: str) -> None:
    """urllib sends the whole body before reading the answer: it must get the 413, not a
    broken pipe."""
    body = b'{"objects": [' + b'{"properties": {"text": "xxxxxxxx"}},' * 600_000 + b"{}]}"
    assert len(body) > 20 * 1024 * 1024
    req = urllib.request.Request(
        f"{gateway_url}/v1/collections/Hard/objects",
        data=body,
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 413
    # Expect: 100-continue: the 413 comes before the body is sent (httpx sends no Expect, so
    # speak HTTP by hand).
    host, port = gateway_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/collections/Hard/objects HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")


def closed_after(
    sock: socket.socket, trickle: bytes = b"", every_s: float = 0.2, limit_s: float = 15.0
) -> float:
    """Seconds until the server closes ``sock`` while we send ``trickle`` a byte at a time."""
    start = time.monotonic()
    sock.settimeout(every_s)
    sent = 0
    while time.monotonic() - start < limit_s:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
            return time.monotonic() - start  # an answer (e.g. 408/400) then close: also fine
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - start
        if sent < len(trickle):
            try:
                sock.send(trickle[sent : sent + 1])
            except OSError:
                return time.monotonic() - start
            sent += 1
    raise AssertionError(f"the connection stayed open for {limit_s} s")


def test_slow_and_idle_connections_are_closed(gateway_url: str) -> None:
    host, port = gateway_url.removeprefix("http://").split(":")
    addr = (host, int(port))
    with socket.create_connection(addr) as sock:  # never sends a byte
        assert closed_after(sock) < HEADER_S + 1.5
    with socket.create_connection(addr) as sock:  # headers a byte every 0.2 s
        slow = b"GET /v1/collections HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 500
        assert closed_after(sock, slow) < HEADER_S + 1.5
    with socket.create_connection(addr) as sock:  # headers at once, then a trickle of body
        sock.sendall(
            b"POST /v1/collections/Hard/query HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        assert closed_after(sock, b" " * 900) < BODY_S + 1.5
    with socket.create_connection(addr) as sock:  # one request, then idle (keep-alive)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_after(sock) < IDLE_S + 1.5
    assert httpx.get(f"{gateway_url}/healthz").status_code == 200  # still serving


def test_cluster_shows_a_restarted_shards_live_pid(
    gateway_url: str, colshard_server: Server
) -> None:

    def placement() -> dict[str, Any]:
        info = httpx.get(f"{gateway_url}/v1/cluster", timeout=60).json()
        (p,) = info["collections"]["Hard"]["placements"]
        return dict(p)

    shard = ShardRef(colshard_server, "colshard:Hard:0")
    old = int(shard.call("ready")["pid"])
    assert placement()["pid"] == old
    shard.kill(no_restart=False)  # Ray restarts its host, which reopens it
    deadline = time.monotonic() + 90
    new = int(shard.ready_after_restart(old, timeout_s=90)["pid"])
    assert new != old
    while time.monotonic() < deadline and placement().get("pid") != new:
        time.sleep(0.5)
    assert placement()["pid"] == new


def test_cli_query_options_and_one_line_import_errors(
    gateway_url: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from gateway.cli import main

    base = ["query", "Hard", "--url", gateway_url]
    with pytest.raises(SystemExit, match="exactly one of"):
        main([*base, "--near-text", "cat", "--bm25", "cat"])
    with pytest.raises(SystemExit, match="exactly one of"):
        main(base)
    assert (
        main(
            [
                *base,
                "--near-vector",
                "[[1, 0, 0, 0]]",
                "--target-vector",
                "mv",
                "--filter",
                '{"path": "text", "operator": "like", "value": "*cat*"}',
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert [o["properties"]["text"] for o in out["objects"]] == ["a nice cat"]
    assert main([*base, "--hybrid", "cat", "--alpha", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["objects"]
    assert main([*base, "--near-vector", "[[1, 0, 0, 0]]", "--target-vector", "nope"]) == 1
    assert "not_found" in capsys.readouterr().err

    assert (
        main(
            [
                "import",
                str(tmp_path / "missing.parquet"),
                "--collection",
                "Hard",
                "--url",
                gateway_url,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["x"]}), path)
    assert main(["import", str(path), "--collection", "Nope", "--url", gateway_url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not_found" in err, err
