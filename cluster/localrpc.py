"""Same-node fast path for shard reads: length-prefixed pickle frames over a Unix socket.

A Ray actor call costs 1.0–2.9 ms on the 2-core machines this runs on (docs/bench.md), most of
a query's overhead. A shard actor also listens on a Unix socket in a private directory
(``socket_dir``: mode 0700, this user only — the same trust as Ray's own local sockets, and the
same pickled payloads); a coordinator on the same Ray node sends its searches there (~0.1–0.3
ms) and everything else, and every failure of the fast path, over Ray.

Frames: 4-byte big-endian length, then ``pickle`` (protocol 5). A request is ``(method,
args)``; a reply is ``(True, value)`` or ``(False, exception)``. The server side lives in
``shard.fastpath``, the client in ``coordinator.fanout``.
"""

from __future__ import annotations

import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 1 << 30
ENABLE_ENV = "COLSHARD_FAST_PATH"


def enabled() -> bool:
    """Off where ``COLSHARD_FAST_PATH=0`` (read by the shard that would serve it and by the
    coordinator that would use it)."""
    return os.environ.get(ENABLE_ENV, "1") != "0"


def socket_dir() -> Path:
    """``<tmp>/colshard-<uid>``, created 0700 (owned by this user, or refused)."""
    path = Path(tempfile.gettempdir()) / f"colshard-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of this user with mode 0700")
    return path


def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=5)
    return HEADER.pack(len(body)) + body


def body_length(header: bytes) -> int:
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {n} bytes is over the limit")
    return int(n)


def unframe(body: bytes) -> Any:
    return pickle.loads(body)
