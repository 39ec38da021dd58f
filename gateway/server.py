"""How a gateway is served: the uvicorn config around ``create_app``, either in a process of its
own that reaches the coordinator over Ray (``colshard gateway``), or inside the coordinator
actor's event loop (``EmbeddedGateway``, what ``colshard serve`` runs by default).

Embedded, a request costs no Ray call between gateway and coordinator: measured on the bench's
small collection (2 shards), HTTP p50 went from 14.1 to 11.2 ms (docs/bench.md).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cluster.api import CoordinatorAPI
from cluster.settings import Settings
from gateway.app import create_app
from gateway.backend import Backend, LocalTransport

# Requests in flight get this long to finish when a gateway stops (Ctrl-C, SIGTERM): `colshard
# serve` then has the rest of its 10 s exit budget (gateway.cli.EXIT_BUDGET_S) to stop Ray.
GRACEFUL_SHUTDOWN_S = 5


def uvicorn_config(
    backend: Backend,
    settings: Settings,
    *,
    api_keys: Sequence[Any] = (),
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "info",
) -> uvicorn.Config:
    """The uvicorn config of a gateway on ``settings.host:port`` (TLS when both ssl files are
    given)."""
    app = create_app(backend, settings, api_keys)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        http=timed_protocol(settings.http_header_timeout_s, settings.http_body_timeout_s),
        timeout_keep_alive=max(1, round(settings.http_idle_timeout_s)),
        limit_concurrency=settings.max_connections or None,
    )


def timed_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with read deadlines it lacks: a connection whose request
    headers are not complete ``header_timeout_s`` after it opened (or after the request's first
    byte), or whose body is not complete ``body_timeout_s`` after its headers, is closed. So
    slow-header / slow-body clients cannot hold connections open (uvicorn only times out idle
    keep-alive connections, after a response)."""

    class TimedHttpToolsProtocol(HttpToolsProtocol):
        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(seconds, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(header_timeout_s)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm(body_timeout_s)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()

    return TimedHttpToolsProtocol


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``; OSError naming the address if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket names its protocol; without it every response waits out the client's
    # delayed ACK (~40 ms per request, measured).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot serve HTTP on {host}:{port}: {exc.strerror}") from None
    return sock


class EmbeddedGateway:
    """The HTTP gateway, run by the coordinator actor in its own event loop (the coordinator's
    ``host`` verb; ``coordinator.actor.HostedServer``). Built by the composition root and sent
    to the actor, so the coordinator never imports the gateway.

    ``run`` serves until ``stop``; stopping drains like Ctrl-C on a gateway process: the
    listening socket closes at once and requests in flight get up to 10 s to finish.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        api_keys: Sequence[Any] = (),
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        log_level: str = "info",
    ) -> None:
        self.settings = settings
        self.api_keys = tuple(api_keys)
        self.ssl_certfile = ssl_certfile
        self.ssl_keyfile = ssl_keyfile
        self.log_level = log_level
        self._server: uvicorn.Server | None = None
        self._stopped = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_server": None, "_stopped": False}

    @property
    def address(self) -> str:
        scheme = "https" if self.ssl_certfile else "http"
        return f"{scheme}://{self.settings.host}:{self.settings.port}"

    async def run(self, target: CoordinatorAPI, started: asyncio.Event) -> None:
        """Serve ``target`` (the coordinator: ``cluster.api.CoordinatorAPI``) until
        ``stop``; ``started`` is set once connections are accepted."""
        # detach: a gateway that stops waiting (its timeout) does not cancel the coordinator's
        # work, exactly as when the call crossed Ray.
        config = uvicorn_config(
            Backend(LocalTransport(target, detach=True)),
            self.settings,
            api_keys=self.api_keys,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
            log_level=self.log_level,
        )
        sock = bind(self.settings.host, self.settings.port)
        server = self._server = uvicorn.Server(config)
        if self._stopped:
            server.should_exit = True
        watcher = asyncio.get_running_loop().create_task(_flag_started(server, started))
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits the process on a failed startup
            raise RuntimeError(
                f"the gateway on {self.address} failed to start (uvicorn "
                f"exit {exc.code}); see the coordinator's log"
            ) from None
        finally:
            watcher.cancel()
            sock.close()

    def stop(self) -> None:
        self._stopped = True
        if self._server is not None:
            self._server.should_exit = True


async def _flag_started(server: uvicorn.Server, started: asyncio.Event) -> None:
    while not server.started:
        await asyncio.sleep(0.01)
    started.set()
