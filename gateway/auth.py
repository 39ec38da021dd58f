"""API keys for the gateway: roles, optional per-collection scope, and the ASGI middleware.

Keys file (``--api-keys-file`` / ``COLSHARD_API_KEYS_FILE``; the Helm chart mounts one from a
Secret) and ``COLSHARD_API_KEYS`` share one syntax: one entry per line (``;`` also separates
entries), ``#`` starts a comment::

    KEY                          # a bare key is an admin key (the chart's "one key per line")
    KEY:reader                   # GET endpoints and queries
    KEY:writer:Articles,Images   # + object writes, only in these collections

Roles nest: ``reader`` may call every ``GET``/``HEAD`` route and ``POST .../query``; ``writer``
may also write objects (``POST/PUT/PATCH/DELETE /v1/collections/{name}/objects...``); ``admin``
may do everything else (create and drop collections, every ``/v1/cluster`` route: it shows
data directories, pids and addresses, so a reader does not see it). A key scoped
to collections reaches only ``/v1/collections/{name}...`` for those names (``GET
/v1/collections`` lists only them; ``/v1/cluster`` needs an unscoped key).

Requests carry ``Authorization: Bearer KEY``. A missing or unknown key gets 401 with a
``WWW-Authenticate: Bearer`` header, a known key without the right gets 403. ``/healthz``,
``/readyz``, ``/metrics`` and the OpenAPI documents (``/openapi.json``, ``/docs``, ``/redoc``)
stay open for probes and scrapers. The key is compared with ``hmac.compare_digest`` against
the SHA-256 of every configured key (no early exit, no length leak), and keys never reach a
log line, an error message or a ``repr``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from cluster.errors import ColshardError, Forbidden, Unauthorized
from gateway.errors import error_body, status_for

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
KEYS_FILE_ENV = "COLSHARD_API_KEYS_FILE"
KEYS_ENV = "COLSHARD_API_KEYS"
SHORT_KEY = 16  # shorter keys load, with a warning
_KEY_RE = re.compile(r"[!-~]+")  # printable ASCII without space
_COLLECTION_PATH = re.compile(r"^/v1/collections/([^/]+)(/.*)?$")
_QUERY_PATH = re.compile(r"^/v1/collections/[^/]+/query$")
_OBJECTS_PATH = re.compile(r"^/v1/collections/[^/]+/objects(/.*)?$")


class Role(enum.IntEnum):
    reader = 1
    writer = 2
    admin = 3


class KeyFileError(ValueError):
    """A malformed keys file or variable. Messages name the line, never the key."""


@dataclass(frozen=True)
class ApiKey:
    """One configured key. ``repr`` and ``str`` never show the key itself."""

    key: str = field(repr=False)
    role: Role = Role.admin
    collections: frozenset[str] | None = None  # None: every collection

    def may_access(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections

    def describe(self) -> str:
        scope = "*" if self.collections is None else ",".join(sorted(self.collections))
        return f"{self.role.name} key ({scope}) #{fingerprint(self.key)}"


def fingerprint(key: str) -> str:
    """A short, non-reversible tag for logs and metrics (first 8 hex digits of SHA-256)."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_api_keys(text: str, source: str = "api keys") -> tuple[ApiKey, ...]:
    """Parse the keys syntax (module docstring). Raises KeyFileError on a bad entry."""
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        for entry in line.split("#", 1)[0].split(";"):
            entry = entry.strip()
            if not entry:
                continue
            where = f"{source}, line {lineno}"
            parts = entry.split(":")
            if len(parts) > 3:
                raise KeyFileError(f"{where}: expected KEY[:ROLE[:COLLECTION,...]]")
            key = parts[0].strip()
            if not _KEY_RE.fullmatch(key):
                raise KeyFileError(f"{where}: a key is printable ASCII without spaces")
            role_name = parts[1].strip() if len(parts) > 1 else "admin"
            try:
                role = Role[role_name]
            except KeyError:
                raise KeyFileError(
                    f"{where}: unknown role {role_name!r} (admin, writer or reader)"
                ) from None
            collections: frozenset[str] | None = None
            if len(parts) == 3 and parts[2].strip() not in ("", "*"):
                collections = frozenset(c.strip() for c in parts[2].split(",") if c.strip())
            if key in seen:
                raise KeyFileError(f"{where}: duplicate key")
            seen.add(key)
            if len(key) < SHORT_KEY:
                log.warning(
                    "%s: key #%s is shorter than %d characters", where, fingerprint(key), SHORT_KEY
                )
            keys.append(ApiKey(key, role, collections))
    return tuple(keys)


def load_api_keys(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> tuple[ApiKey, ...]:
    """Keys from ``path`` (else ``$COLSHARD_API_KEYS_FILE``) plus ``$COLSHARD_API_KEYS``.

    An empty result means auth is off. A named file that is missing or empty is an error (a
    mounted Secret that did not arrive must not silently open the API)."""
    env = os.environ if environ is None else environ
    keys: list[ApiKey] = []
    file_name = str(path) if path else env.get(KEYS_FILE_ENV, "")
    if file_name:
        try:
            text = Path(file_name).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(
                f"cannot read the API keys file {file_name}: {exc.strerror or exc}"
            ) from None
        from_file = parse_api_keys(text, file_name)
        if not from_file:
            raise KeyFileError(f"the API keys file {file_name} holds no key")
        keys.extend(from_file)
    inline = env.get(KEYS_ENV, "")
    if inline.strip():
        keys.extend(parse_api_keys(inline, KEYS_ENV))
    if len({k.key for k in keys}) != len(keys):
        raise KeyFileError("the same key is configured twice (file and environment)")
    return tuple(keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KeyTable:
    """Constant-time lookup: every request hashes its key and compares it with all keys."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)
        self._digests = [(hashlib.sha256(k.key.encode()).digest(), k) for k in self.keys]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: ApiKey | None = None
        for expected, key in self._digests:  # no early exit
            if hmac.compare_digest(digest, expected):
                found = key
        return found


def required_role(method: str, path: str) -> Role | None:
    """The least role a route needs; None for the open paths."""
    if path in OPEN_PATHS:
        return None
    if path == "/v1/cluster" or path.startswith("/v1/cluster/"):
        return Role.admin  # node addresses, pids and data directories
    if path == "/v1/backups" or path.startswith("/v1/backups/"):
        return Role.admin  # every collection's data
    if method in ("GET", "HEAD", "OPTIONS"):
        return Role.reader
    if method == "POST" and _QUERY_PATH.match(path):
        return Role.reader
    if _OBJECTS_PATH.match(path):
        return Role.writer
    return Role.admin


def authorize(key: ApiKey, method: str, path: str) -> None:
    """Raise Forbidden unless ``key`` may call ``method path``."""
    need = required_role(method, path)
    if need is None:
        return
    if key.role < need:
        raise Forbidden(
            f"this API key ({key.role.name}) may not {method} {path}; "
            f"it needs the {need.name} role",
            {"role": key.role.name, "required": need.name},
        )
    if key.collections is None:
        return
    match = _COLLECTION_PATH.match(path)
    if match is not None:
        check_collection(key, match.group(1))
        return
    if path == "/v1/collections" and method in ("GET", "POST"):
        return  # the list is filtered to the scope; a create is checked against its body
    raise Forbidden(
        f"this API key is limited to collections; {method} {path} needs an unscoped key",
        {"collections": sorted(key.collections)},
    )


def check_collection(key: ApiKey | None, collection: str) -> None:
    if key is not None and not key.may_access(collection):
        raise Forbidden(
            f"this API key may not access collection {collection!r}", {"collection": collection}
        )


def principal(request: Request) -> ApiKey | None:
    """The authenticated key of a request (None when auth is off)."""
    key = request.scope.get("colshard.api_key")
    return key if isinstance(key, ApiKey) else None


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class ApiKeyAuth:
    """ASGI middleware: authenticate, authorize by route, put the key in the scope."""

    def __init__(
        self, app: ASGIApp, keys: KeyTable, on_reject: Callable[[int], None] | None = None
    ) -> None:
        self.app = app
        self.keys = keys
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        token = bearer_token(scope.get("headers") or [])
        key = self.keys.find(token) if token is not None else None
        if key is None:
            client = scope.get("client") or ("?", 0)
            log.info(
                "401 %s %s from %s: %s",
                method,
                path,
                client[0],
                "no bearer token" if token is None else "unknown API key",
            )
            challenge = (
                'Bearer realm="colshard"'
                if token is None
                else 'Bearer realm="colshard", error="invalid_token"'
            )
            await self._reject(
                send,
                Unauthorized(
                    "missing API key (Authorization: Bearer <key>)"
                    if token is None
                    else "invalid API key"
                ),
                challenge,
            )
            return
        try:
            authorize(key, method, path)
        except Forbidden as exc:
            log.info("403 %s %s for %s", method, path, key.describe())
            await self._reject(send, exc, None)
            return
        scope["colshard.api_key"] = key
        await self.app(scope, receive, send)

    async def _reject(self, send: Send, exc: ColshardError, challenge: str | None) -> None:
        status = status_for(exc)
        if self.on_reject is not None:
            self.on_reject(status)
        body = json.dumps(error_body(exc)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if challenge is not None:
            headers.append((b"www-authenticate", challenge.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
