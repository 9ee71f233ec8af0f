"""One exception root. Transient errors are retried; bad input is reported, never retried."""

from __future__ import annotations

from typing import Any


class DocqueueError(Exception):
    """Root of every error docqueue raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, **where: Any) -> None:
        super().__init__(message)
        self.message = message
        # Where the fault is: row, line, column ... (only the keys that apply).
        self.where = {k: v for k, v in where.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.where}


class TransientError(DocqueueError):
    """Worth retrying later: a database or broker that is unreachable, an engine that died."""

    status_code = 503
    code = "unavailable"


class BadInputError(DocqueueError):
    """The caller's input is wrong; retrying the same input fails the same way."""

    status_code = 400
    code = "bad_input"


class InvalidFileError(BadInputError):
    """The uploaded file cannot be ingested (encoding, columns, sizes, duplicates)."""

    code = "invalid_file"


class InvalidParameterError(BadInputError):
    """A job parameter is missing or wrong (task, labels, prompt template ...)."""

    status_code = 422
    code = "invalid_parameter"


class PayloadTooLargeError(BadInputError):
    status_code = 413
    code = "payload_too_large"


class AuthError(DocqueueError):
    status_code = 401
    code = "unauthorized"


class NotFoundError(DocqueueError):
    """Also what another tenant's job looks like: 404, never 403."""

    status_code = 404
    code = "not_found"


class ConflictError(DocqueueError):
    status_code = 409
    code = "conflict"
