"""Helpers for integration tests that start whole processes (Ray nodes, ``colshard serve``):
loopback ports, polling, and finding/killing exactly the processes a test started - by a
marker in their environment, which Ray's worker processes inherit - never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def marked_pids(marker: str) -> set[int]:
    """PIDs of live processes whose environment carries ``COLSHARD_TEST_MARKER=marker``."""
    needle = f"COLSHARD_TEST_MARKER={marker}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


def wait_until(
    what: str, check: Callable[[], Any], timeout_s: float, interval_s: float = 0.5
) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def kill_marked(marker: str) -> None:
    """SIGKILL every live process carrying the marker, by PID."""
    for pid in marked_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
