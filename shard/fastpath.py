"""The shard's side of the same-node fast path (``cluster.localrpc``): a Unix socket served by
daemon threads, answering a fixed set of read verbs with the actor's own methods (so fault
injection, data-loss refusal and metrics apply exactly as over Ray)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cluster.errors import ColshardError, InternalError
from cluster.localrpc import body_length, frame, socket_dir, unframe

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(directory: Path) -> None:
    """Sockets left by processes that died (SIGKILL leaves them behind): ``<pid>-*.sock``."""
    for path in directory.glob("*.sock"):
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


class FastPathServer:
    """Serves ``verbs`` (name -> callable) on a fresh Unix socket until ``close``."""

    def __init__(
        self, verbs: Mapping[str, Callable[..., Any]], directory: Path | None = None
    ) -> None:
        self._verbs = dict(verbs)
        directory = directory or socket_dir()
        _remove_stale(directory)
        self.path = directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._sock.listen(64)
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self.served = 0  # calls answered (visible in the actor's ready())
        self._lock = threading.Lock()
        atexit.register(self.close)  # a clean exit leaves no socket file (SIGKILL does)
        threading.Thread(target=self._accept, name="colshard-fastpath", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="colshard-fastpath-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while not self._closed.is_set():
                header = reader.read(4)
                if len(header) < 4:
                    return  # the client closed the connection
                try:
                    body = reader.read(body_length(header))
                    method, args = unframe(body)
                    verb = self._verbs.get(method)
                    if verb is None:
                        raise InternalError(f"fast path: unknown verb {method!r}")
                    reply: tuple[bool, Any] = (True, verb(*args))
                except ColshardError as exc:
                    reply = (False, exc)
                except Exception as exc:  # answered, never crashes the thread
                    log.exception("fast path call failed")
                    reply = (False, InternalError(f"shard failed: {exc!r}"))
                self.served += 1
                try:
                    data = frame(reply)
                except Exception as exc:  # an unpicklable answer: say so instead
                    data = frame((False, InternalError(f"shard answer not sendable: {exc!r}")))
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:  # open connections end too: nothing is answered after close
            conns, self._conns = set(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.path.unlink()
