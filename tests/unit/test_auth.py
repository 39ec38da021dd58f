"""API keys: the keys syntax, the route -> role table, scopes, constant-time lookup, and the CLI's
refusal to serve a non-loopback address without keys."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from cluster.errors import Forbidden
from gateway.auth import (
    ApiKey,
    KeyFileError,
    KeyTable,
    Role,
    authorize,
    bearer_token,
    is_loopback,
    load_api_keys,
    parse_api_keys,
    required_role,
)
from gateway.cli import build_parser, main, security_from_args

SECRET = "s3cr3t-key-0123456789abcdef"


def test_syntax_bare_keys_are_admin_and_roles_and_scopes_parse() -> None:
    keys = parse_api_keys(f"""
        # comment
        {SECRET}
        reader-key-0123456789:reader     # trailing comment
        writer-key-0123456789:writer:Articles, Images ; scoped-admin-0123456:admin:*
    """)
    assert [(k.key, k.role, k.collections) for k in keys] == [
        (SECRET, Role.admin, None),
        ("reader-key-0123456789", Role.reader, None),
        ("writer-key-0123456789", Role.writer, frozenset({"Articles", "Images"})),
        ("scoped-admin-0123456", Role.admin, None),
    ]
    assert parse_api_keys("\n  \n# nothing\n") == ()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f"{SECRET}:owner", "unknown role 'owner'"),
        (f"{SECRET}\n{SECRET}:reader", "line 2: duplicate key"),
        (f"{SECRET}:reader:A:B", "expected KEY[:ROLE[:COLLECTION,...]]"),
        (":reader", "printable ASCII"),
        ("k\u00e9y-0123456789abcdef", "printable ASCII"),
    ],
)
def test_syntax_errors_name_the_line_never_the_key(text: str, fragment: str) -> None:
    with pytest.raises(KeyFileError) as info:
        parse_api_keys(text, "keys.txt")
    assert fragment in str(info.value)
    assert "keys.txt, line" in str(info.value)
    assert SECRET not in str(info.value)


def test_short_keys_load_with_a_warning_that_hides_them(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        (key,) = parse_api_keys("tiny")
    assert key.role is Role.admin
    assert "shorter than" in caplog.text and "tiny" not in caplog.text


def test_repr_never_shows_the_key() -> None:
    key = ApiKey(SECRET, Role.writer, frozenset({"A"}))
    assert SECRET not in repr(key) and SECRET not in str(key) and SECRET not in key.describe()


def test_load_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_text(f"{SECRET}\n")
    env = {"COLSHARD_API_KEYS_FILE": str(path), "COLSHARD_API_KEYS": "reader-key-0123456789:reader"}
    assert [k.role for k in load_api_keys(None, env)] == [Role.admin, Role.reader]
    # An explicit path wins over the variable; no configuration at all: auth off.
    other = tmp_path / "other"
    other.write_text("other-key-0123456789:writer\n")
    assert [k.key for k in load_api_keys(other, {"COLSHARD_API_KEYS_FILE": str(path)})] == [
        "other-key-0123456789"
    ]
    assert load_api_keys(None, {}) == ()


def test_a_named_file_must_exist_and_hold_a_key(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        load_api_keys(tmp_path / "missing", {})
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n")
    with pytest.raises(KeyFileError, match="holds no key"):
        load_api_keys(empty, {})
    dup = tmp_path / "dup"
    dup.write_text(f"{SECRET}\n")
    with pytest.raises(KeyFileError, match="twice"):
        load_api_keys(dup, {"COLSHARD_API_KEYS": SECRET})


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/metrics", None),
        ("GET", "/openapi.json", None),
        ("GET", "/docs", None),
        ("GET", "/v1/collections", Role.reader),
        ("GET", "/v1/collections/A", Role.reader),
        ("GET", "/v1/collections/A/objects", Role.reader),
        ("GET", "/v1/collections/A/objects/x", Role.reader),
        ("GET", "/v1/cluster", Role.admin),
        ("HEAD", "/v1/collections", Role.reader),
        ("POST", "/v1/collections/A/query", Role.reader),
        ("POST", "/v1/collections/A/objects", Role.writer),
        ("POST", "/v1/collections/A/objects/delete", Role.writer),
        ("PUT", "/v1/collections/A/objects/x", Role.writer),
        ("PATCH", "/v1/collections/A/objects/x", Role.writer),
        ("DELETE", "/v1/collections/A/objects/x", Role.writer),
        ("POST", "/v1/collections", Role.admin),
        ("DELETE", "/v1/collections/A", Role.admin),
        ("POST", "/v1/cluster/drain", Role.admin),
        ("POST", "/v1/cluster/nodes/n1/drain", Role.admin),
        ("DELETE", "/v1/cluster/nodes/n1/drain", Role.admin),
        ("POST", "/v1/collections/A/shards/0/move", Role.admin),
        ("GET", "/v1/backups", Role.admin),
        ("GET", "/v1/backups/b1", Role.admin),
        ("POST", "/v1/backups", Role.admin),
        ("POST", "/v1/backups/b1/restore", Role.admin),
        ("POST", "/v1/anything-new", Role.admin),
        ("POST", "/v1/collections/A/query/extra", Role.admin),
    ],
)
def test_route_roles(method: str, path: str, role: Role | None) -> None:
    assert required_role(method, path) == role


def test_roles_nest_and_scopes_bind() -> None:
    reader = ApiKey("r" * 20, Role.reader)
    writer = ApiKey("w" * 20, Role.writer, frozenset({"A"}))
    admin_a = ApiKey("a" * 20, Role.admin, frozenset({"A"}))
    authorize(reader, "POST", "/v1/collections/B/query")
    with pytest.raises(Forbidden, match="needs the writer role"):
        authorize(reader, "POST", "/v1/collections/B/objects")
    authorize(writer, "PUT", "/v1/collections/A/objects/x")
    with pytest.raises(Forbidden, match="collection 'B'"):
        authorize(writer, "GET", "/v1/collections/B")
    with pytest.raises(Forbidden, match="needs the admin role"):
        authorize(writer, "DELETE", "/v1/collections/A")
    authorize(admin_a, "DELETE", "/v1/collections/A")
    authorize(admin_a, "POST", "/v1/collections")  # the route checks the body's name
    authorize(writer, "GET", "/v1/collections")  # the route filters the list
    with pytest.raises(Forbidden, match="needs the admin role"):
        authorize(writer, "GET", "/v1/cluster")
    with pytest.raises(Forbidden, match="unscoped key"):
        authorize(admin_a, "GET", "/v1/cluster")


def test_key_table_finds_exactly_the_configured_keys() -> None:
    table = KeyTable(parse_api_keys(f"{SECRET}\nreader-key-0123456789:reader"))
    found = table.find(SECRET)
    assert found is not None and found.role is Role.admin
    assert table.find("reader-key-0123456789") is not None
    for wrong in ("", SECRET[:-1], SECRET + "x", SECRET.upper(), "\u00e9"):
        assert table.find(wrong) is None
    assert not KeyTable(())


def test_bearer_token_parsing() -> None:
    assert bearer_token([(b"authorization", b"Bearer abc")]) == "abc"
    assert bearer_token([(b"Authorization", b"bearer   abc  ")]) == "abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([(b"authorization", b"Bearer ")]) is None
    assert bearer_token([]) is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_cli_refuses_a_public_address_without_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("COLSHARD_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("COLSHARD_API_KEYS", raising=False)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main() sets a SIGTERM handler
    data = tmp_path / "data"
    # Refused before anything starts: no etcd, no Ray, no data directory.
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(data)]) == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in capsys.readouterr().err
    assert not data.exists()
    assert (
        main(
            [
                "gateway",
                "--host",
                "0.0.0.0",
                "--etcd",
                "127.0.0.1:1",
                "--ray-address",
                "127.0.0.1:1",
            ]
        )
        == 2
    )

    def security(*argv: str) -> object:
        args = build_parser().parse_args(["gateway", *argv])
        return security_from_args(args, args.host)

    assert security("--host", "0.0.0.0", "--allow-insecure") == ()
    assert security("--host", "127.0.0.1") == ()
    keys = tmp_path / "keys"
    keys.write_text(f"{SECRET}\n")
    loaded = security("--host", "0.0.0.0", "--api-keys-file", str(keys))
    assert isinstance(loaded, tuple) and len(loaded) == 1
    monkeypatch.setenv("COLSHARD_API_KEYS", "env-key-0123456789abc:reader")
    loaded = security("--host", "0.0.0.0")
    assert isinstance(loaded, tuple) and len(loaded) == 1
    assert security("--host", "0.0.0.0", "--api-keys-file", str(tmp_path / "nope")) is None
    assert security("--ssl-certfile", "c.pem") is None  # the key file is missing
    err = capsys.readouterr().err
    assert "--ssl-certfile and --ssl-keyfile go together" in err and SECRET not in err
