"""API-key auth on a real gateway (real uvicorn, coordinator, shard actors, etcd): 401/403 by
role and collection scope, open probe paths, the SDK's typed errors, and no key in any log."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.errors import Forbidden, Unauthorized
from gateway.auth import parse_api_keys
from gateway.client import Client, NamedVector, Property
from tests.integration.conftest import Server
from tests.integration.gateways import extra_gateway

pytestmark = pytest.mark.integration

ADMIN = "admin-key-7f3a9c2e41d8b6a0"
WRITER = "writer-key-1b2c3d4e5f60718293"
READER = "reader-key-a1b2c3d4e5f6a7b8c9"
SCOPED = "scoped-writer-0f1e2d3c4b5a69788"
SCOPED_ADMIN = "scoped-admin-99aa88bb77cc66dd55"
WRONG = "wrong-key-0000111122223333444"
ALL_KEYS = (ADMIN, WRITER, READER, SCOPED, SCOPED_ADMIN, WRONG)
KEYS_FILE = f"""# the syntax of --api-keys-file
{ADMIN}
{WRITER}:writer
{READER}:reader
{SCOPED}:writer:AuthA
{SCOPED_ADMIN}:admin:AuthA,AuthC
"""
OBJ = {"properties": {"text": "a cat"}, "vectors": {"mv": [[0.1, 0.2, 0.3, 0.4]]}}
QUERY = {"near_vector": {"vector": [[0.1, 0.2, 0.3, 0.4]]}, "limit": 3}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def auth_url(colshard_server: Server) -> Iterator[str]:
    with extra_gateway(
        colshard_server.settings,
        colshard_server.handle,
        api_keys=parse_api_keys(KEYS_FILE),
        log_level="debug",
    ) as url:
        with httpx.Client(base_url=url, timeout=60, headers=bearer(ADMIN)) as http:
            for name in ("AuthA", "AuthB"):
                r = http.post(
                    "/v1/collections",
                    json={
                        "name": name,
                        "properties": [{"name": "text", "data_type": "text"}],
                        "vectors": [{"name": "mv", "dim": 4}],
                        "shard_count": 1,
                    },
                )
                assert r.status_code == 201, r.text
        yield url


def test_probes_and_docs_stay_open(auth_url: str) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{auth_url}{path}", timeout=30).status_code == 200, path


def test_missing_wrong_or_malformed_key_is_401(auth_url: str) -> None:
    r = httpx.get(f"{auth_url}/v1/collections", timeout=30)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="colshard"'
    assert r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(f"{auth_url}/v1/collections", headers=bearer(WRONG), timeout=30)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    for header in (f"Basic {ADMIN}", ADMIN, "Bearer", f"Bearer {ADMIN[:-1]}"):
        r = httpx.get(f"{auth_url}/v1/collections", headers={"Authorization": header}, timeout=30)
        assert r.status_code == 401, header
    # Unknown routes and big bodies are turned away before routing or reading the body.
    assert httpx.get(f"{auth_url}/v1/nowhere", timeout=30).status_code == 401
    r = httpx.post(
        f"{auth_url}/v1/collections/AuthA/objects",
        content=b"x" * (1 << 20),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 401


def test_roles(auth_url: str) -> None:
    def call(key: str, method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(method, f"{auth_url}{path}", headers=bearer(key), timeout=60, **kwargs)  # type: ignore[arg-type]

    # reader: GET and queries only.
    assert call(READER, "GET", "/v1/collections").status_code == 200
    assert call(READER, "GET", "/v1/collections/AuthA").status_code == 200
    assert call(READER, "GET", "/v1/cluster").status_code == 403  # pids, dirs, addresses
    assert call(READER, "POST", "/v1/collections/AuthA/query", json=QUERY).status_code == 200
    r = call(READER, "POST", "/v1/collections/AuthA/objects", json={"objects": [OBJ]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert r.json()["error"]["details"] == {"role": "reader", "required": "writer"}
    # writer: + object writes, no schema changes.
    r = call(WRITER, "POST", "/v1/collections/AuthB/objects", json={"objects": [OBJ]})
    assert r.status_code == 200 and r.json()["n_ok"] == 1, r.text
    oid = r.json()["results"][0]["id"]
    assert (
        call(
            WRITER,
            "PATCH",
            f"/v1/collections/AuthB/objects/{oid}",
            json={"properties": {"text": "a dog"}},
        ).status_code
        == 200
    )
    assert call(WRITER, "DELETE", f"/v1/collections/AuthB/objects/{oid}").status_code == 200
    assert (
        call(
            WRITER,
            "POST",
            "/v1/collections",
            json={"name": "AuthX", "vectors": [{"name": "mv", "dim": 4}]},
        ).status_code
        == 403
    )
    assert call(WRITER, "DELETE", "/v1/collections/AuthB").status_code == 403
    # scoped writer: only AuthA; the list shows only AuthA; cluster-wide views need no scope.
    r = call(SCOPED, "POST", "/v1/collections/AuthA/objects", json={"objects": [OBJ]})
    assert r.status_code == 200, r.text
    assert call(SCOPED, "GET", "/v1/collections/AuthB").status_code == 403
    assert call(SCOPED, "POST", "/v1/collections/AuthB/query", json=QUERY).status_code == 403
    names = [c["name"] for c in call(SCOPED, "GET", "/v1/collections").json()["collections"]]
    assert names == ["AuthA"]
    assert call(SCOPED, "GET", "/v1/cluster").status_code == 403
    # scoped admin: creates and drops only inside its scope.
    body = {"vectors": [{"name": "mv", "dim": 4}], "shard_count": 1}
    r = call(SCOPED_ADMIN, "POST", "/v1/collections", json={"name": "AuthD", **body})
    assert r.status_code == 403, r.text
    r = call(SCOPED_ADMIN, "POST", "/v1/collections", json={"name": "AuthC", **body})
    assert r.status_code == 201, r.text
    assert call(SCOPED_ADMIN, "DELETE", "/v1/collections/AuthB").status_code == 403
    assert call(SCOPED_ADMIN, "DELETE", "/v1/collections/AuthC").status_code == 200
    # admin: everything.
    r = call(ADMIN, "POST", "/v1/collections", json={"name": "AuthE", **body})
    assert r.status_code == 201, r.text
    assert call(ADMIN, "DELETE", "/v1/collections/AuthE").status_code == 200
    metrics = httpx.get(f"{auth_url}/metrics", timeout=30).text
    assert 'colshard_http_auth_rejections_total{status="403"}' in metrics


def test_sdk_sends_the_key_and_raises_typed_errors(auth_url: str) -> None:
    with Client(auth_url, api_key=READER) as client:
        assert client.is_ready()
        res = client.collections.get("AuthA").query.near_vector([[0.1, 0.2, 0.3, 0.4]], limit=2)
        assert res.missing_shards == []
        with pytest.raises(Forbidden):
            client.collections.get("AuthA").data.insert(
                {"text": "x"}, {"mv": [[0.1, 0.2, 0.3, 0.4]]}
            )
    with Client(auth_url, api_key=WRONG) as client, pytest.raises(Unauthorized):
        client.collections.list_all()
    with Client(auth_url, api_key="") as client, pytest.raises(Unauthorized):
        client.collections.list_all()
    with Client(auth_url, api_key=ADMIN) as client:
        col = client.collections.create(
            "AuthSdk",
            properties=[Property("text", "text")],
            vectors=[NamedVector("mv", dim=4)],
            shard_count=1,
        )
        assert col.data.insert({"text": "x"}, {"mv": [[0.1, 0.2, 0.3, 0.4]]})
        client.collections.delete("AuthSdk")


def test_keys_never_reach_a_log(auth_url: str, caplog: pytest.LogCaptureFixture) -> None:
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            for key in ALL_KEYS:
                for path in ("/v1/collections", "/v1/cluster", f"/v1/collections/AuthA?k={1}"):
                    httpx.get(f"{auth_url}{path}", headers=bearer(key), timeout=30)
                httpx.post(
                    f"{auth_url}/v1/collections",
                    headers=bearer(key),
                    timeout=30,
                    json={"name": "Nope", "vectors": []},
                )
            httpx.get(
                f"{auth_url}/v1/collections",
                headers={"Authorization": f"Basic {ADMIN}"},
                timeout=30,
            )
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    text = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    assert "401 GET /v1/collections" in text  # the auth log lines were captured
    assert "GET /v1/cluster" in text  # and so were uvicorn's access lines
    for key in ALL_KEYS:
        assert key not in text and key not in caplog.text


def self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


def test_tls_gateway(colshard_server: Server, tmp_path: Path) -> None:
    """--ssl-certfile/--ssl-keyfile: the gateway speaks HTTPS (config built as the CLI does)."""
    cert, key = self_signed(tmp_path)
    with extra_gateway(
        colshard_server.settings,
        colshard_server.handle,
        api_keys=parse_api_keys(KEYS_FILE),
        ssl_certfile=cert,
        ssl_keyfile=key,
    ) as url:
        assert url.startswith("https://")
        with Client(url, api_key=READER, verify=cert) as client:
            assert client.is_ready()
            assert "AuthA" in [c["name"] for c in client.collections.list_all()]
        with pytest.raises(httpx.ConnectError):  # not trusted without the CA
            httpx.get(f"{url}/healthz", timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=10)


def test_cli_query_sends_the_api_key(
    auth_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    monkeypatch.delenv("COLSHARD_API_KEY", raising=False)
    argv = ["query", "AuthA", "--bm25", "anything", "--url", auth_url]
    assert main(argv) == 1  # no key: 401
    assert "unauthorized" in capsys.readouterr().err
    assert main([*argv, "--api-key", READER]) == 0
    assert '"objects"' in capsys.readouterr().out
    monkeypatch.setenv("COLSHARD_API_KEY", READER)
    assert main(argv) == 0
