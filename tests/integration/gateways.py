"""Extra gateways for integration tests: a real uvicorn (thread, free loopback port) serving a
``create_app`` with its own settings / API keys in front of an existing coordinator actor."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from cluster.embedded_etcd import find_free_ports
from cluster.settings import Settings


@contextmanager
def extra_gateway(
    settings: Settings,
    handle: Any,
    *,
    api_keys: Sequence[Any] = (),
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "warning",
) -> Iterator[str]:
    """Yield the base URL of a gateway built exactly as ``colshard gateway`` builds it."""
    from gateway.cli import gateway_config

    port = find_free_ports(1)[0]
    config = gateway_config(
        replace(settings, host="127.0.0.1", port=port),
        handle,
        api_keys=api_keys,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level=log_level,
    )
    running = serve_in_thread(config)
    scheme = "https" if ssl_certfile else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        stop_thread(running)


def serve_in_thread(config: Any, timeout_s: float = 30.0) -> tuple[Any, threading.Thread]:
    """Start ``uvicorn.Server(config)`` in a daemon thread; return once it accepts connections.
    Stop it with ``stop_thread``."""
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout_s
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.05)
    return server, thread


def stop_thread(running: tuple[Any, threading.Thread]) -> None:
    server, thread = running
    server.should_exit = True
    thread.join(timeout=15)
