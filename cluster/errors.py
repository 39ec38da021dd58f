"""colshard's error types: one tree, one place.

    ColshardError                 code            HTTP (gateway/errors.py owns the table)
    ├── InvalidInput              invalid_input   422  bad dims, NaN, ragged matrix, bad filter ...
    │   └── BadRequest            bad_request     400  body not parseable at all
    ├── Unauthorized              unauthorized    401
    ├── Forbidden                 forbidden       403
    ├── NotFound                  not_found       404  unknown collection / object / named vector
    ├── AlreadyExists             already_exists  409
    ├── PayloadTooLarge           payload_too_large 413
    ├── Unavailable               unavailable     503  etcd down, shard without a live replica
    ├── DataLost                  shard_data_lost 503  a shard replica restarted without its data
    ├── StorageError              storage_error   503  the shard could not make a write durable
    │   └── InsufficientStorage   insufficient_storage 507  disk full / file size limit
    ├── DeadlineExceeded          deadline_exceeded 504
    └── InternalError             internal        500

Internal errors carry a stable ``code`` and a ``details`` dict; they cross Ray actor boundaries
(plain picklable exceptions) and are mapped to HTTP status codes only by the gateway.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ColshardError(Exception):
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the type and details across pickling (Ray actor boundaries).
        return (self.__class__, (self.message, self.details))

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidInput(ColshardError):
    code = "invalid_input"


class BadRequest(InvalidInput):
    code = "bad_request"


class Unauthorized(ColshardError):
    code = "unauthorized"


class Forbidden(ColshardError):
    code = "forbidden"


class NotFound(ColshardError):
    code = "not_found"


class AlreadyExists(ColshardError):
    code = "already_exists"


class PayloadTooLarge(ColshardError):
    code = "payload_too_large"


class Unavailable(ColshardError):
    code = "unavailable"


class ShardNotOpen(Unavailable):
    """The shard host asked has no such shard open (it restarted, or never opened it): the
    caller opens it there again and retries (``coordinator.fanout``)."""

    code = "shard_not_open"


class TooManyRequests(ColshardError):
    """A costly operation that runs one at a time is already running (e.g. a recall report)."""

    code = "too_many_requests"


class DataLost(ColshardError):
    """A shard replica that Ray restarted where its data directory is empty (another node, or
    the directory was wiped): it serves and accepts nothing until a catch-up from another
    replica refilled it (``ShardActor.clear_lost``). Not retried like ``Unavailable``: waiting
    does not bring the data back."""

    code = "shard_data_lost"


class StorageError(ColshardError):
    """A write could not be made durable (I/O error on the shard's disk). Nothing of that write
    was acknowledged or kept; earlier acknowledged writes are intact."""

    code = "storage_error"


class InsufficientStorage(StorageError):
    """The shard's disk is full (or a file size limit was hit); retry once space is freed."""

    code = "insufficient_storage"


class DeadlineExceeded(ColshardError):
    code = "deadline_exceeded"


class InternalError(ColshardError):
    code = "internal"


ALL_ERRORS: tuple[type[ColshardError], ...] = (
    InvalidInput,
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    AlreadyExists,
    PayloadTooLarge,
    Unavailable,
    ShardNotOpen,
    DataLost,
    StorageError,
    InsufficientStorage,
    DeadlineExceeded,
    InternalError,
)

ERROR_BY_CODE: dict[str, type[ColshardError]] = {e.code: e for e in ALL_ERRORS}


def error_from_dict(payload: dict[str, Any]) -> ColshardError:
    """Rebuild a typed error from its wire form (used by the SDK)."""
    cls = ERROR_BY_CODE.get(str(payload.get("code", "internal")), ColshardError)
    return cls(str(payload.get("message", "")), dict(payload.get("details") or {}))
