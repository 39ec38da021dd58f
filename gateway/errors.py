"""The one table from colshard error codes to HTTP status codes. The SDK inverts it."""

from __future__ import annotations

from cluster.errors import (
    AlreadyExists,
    BadRequest,
    ColshardError,
    DataLost,
    DeadlineExceeded,
    Forbidden,
    InsufficientStorage,
    InternalError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    StorageError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)

STATUS_BY_ERROR: dict[type[ColshardError], int] = {
    BadRequest: 400,
    InvalidInput: 422,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    AlreadyExists: 409,
    PayloadTooLarge: 413,
    TooManyRequests: 429,
    Unavailable: 503,
    DataLost: 503,
    StorageError: 503,
    InsufficientStorage: 507,
    DeadlineExceeded: 504,
    InternalError: 500,
}


def status_for(exc: ColshardError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_body(exc: ColshardError) -> dict[str, object]:
    return {"error": exc.to_dict()}
