"""One exception root, split three ways by what the caller should do about it.

- ``BadInputError``: the caller's input is wrong; a 4xx at the API, or one row's error in a
  job's results. Retrying the same input fails the same way.
- ``TransientError``: a dependency is away (database, broker, engine, the API seen from the
  CLI). The chunk task retries on this class and on nothing else; the store, the engine and the
  client raise it by wrapping their drivers' errors.
- ``FatalError``: neither retrying nor changing the input helps this process: a lease someone
  else now holds, a configuration that cannot start safely.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

#: What an error may echo back. Messages and locations can carry user data (a column name, an
#: id, a header line): a hostile upload must not turn into a hostile error body or log line.
MAX_MESSAGE_CHARS = 2000
MAX_WHERE_CHARS = 200


def clip(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` characters, saying how much was left out.

    Idempotent: a clipped value is within ``limit``, so clipping it again changes nothing (an
    error rebuilt from another process's message keeps its text).
    """
    if len(value) <= limit:
        return value
    # The count left out is below len(value), so its suffix is no longer than this one.
    keep = max(limit - len(f"... ({len(value)} more characters)"), 0)
    return value[:keep] + f"... ({len(value) - keep} more characters)"


class DocqueueError(Exception):
    """Root of every error docqueue raises on purpose."""

    status_code = 500
    code = "internal_error"
    #: Extra response headers the API sends with this error (``Retry-After`` ...).
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str, **where: Any) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        # Where the fault is: row, line, column ... (only the keys that apply), text clipped.
        self.where = {
            k: clip(v, MAX_WHERE_CHARS) if isinstance(v, str) else v
            for k, v in where.items()
            if v is not None
        }

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.where}


# --- bad input ---------------------------------------------------------------------------------


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


class AuthError(BadInputError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(BadInputError):
    """A tenant key on an admin route (``/v1/tenants``, ``/v1/workers`` ...). Never for another
    tenant's object: that is a 404, like a missing one."""

    status_code = 403
    code = "forbidden"


class NotFoundError(BadInputError):
    """Also what another tenant's job looks like: 404, never 403."""

    status_code = 404
    code = "not_found"


class ConflictError(BadInputError):
    status_code = 409
    code = "conflict"


class IdempotencyConflictError(ConflictError):
    """An ``Idempotency-Key`` reused with a different request: retrying cannot succeed, so the
    OpenAI-style ``x-should-retry: false`` tells SDKs not to."""

    code = "idempotency_key_reused"
    headers: ClassVar[Mapping[str, str]] = {"x-should-retry": "false"}


class ResultsExpiredError(BadInputError):
    """The job exists but retention has purged its documents and results."""

    status_code = 410
    code = "results_expired"

    @classmethod
    def for_job(cls, job_id: object, expired_at: datetime, days: float) -> ResultsExpiredError:
        return cls(
            f"the results of job {job_id} expired on {expired_at.isoformat()}: results are kept "
            f"{days:g} days after a job finishes (DOCQUEUE_RETENTION_DAYS); the job's counts "
            "remain",
            expired_at=expired_at.isoformat(),
        )


class JobDeletedError(BadInputError):
    """The job was deleted by its tenant: its tombstone (counts) answers, its rows are gone."""

    status_code = 410
    code = "job_deleted"

    @classmethod
    def for_job(cls, job_id: object, deleted_at: datetime) -> JobDeletedError:
        return cls(
            f"job {job_id} was deleted on {deleted_at.isoformat()}: its documents and results "
            "are gone; GET /v1/jobs/{id} still shows its counts",
            deleted_at=deleted_at.isoformat(),
        )


class QuotaExceededError(BadInputError):
    """A tenant's quota would be exceeded: 429 naming the quota, its limit and its use.

    ``Retry-After`` comes from ``where["retry_after_s"]`` rather than a class constant: a daily
    quota frees up at the next UTC midnight, a running-jobs quota as work finishes. ``where``
    is what travels back from a submit pool process, so the header survives the trip."""

    status_code = 429
    code = "quota_exceeded"

    @property  # per instance: a class constant cannot know the wait
    def headers(self) -> Mapping[str, str]:  # type: ignore[override]
        return {"Retry-After": str(int(self.where.get("retry_after_s", 60)))}


class RowError(BadInputError):
    """This one document cannot be processed; its row gets the error and the chunk goes on."""

    status_code = 422
    code = "row_error"


# --- transient ---------------------------------------------------------------------------------


class TransientError(DocqueueError):
    """Worth retrying later: a database or broker that is unreachable, an engine that died."""

    status_code = 503
    code = "unavailable"


class StoreUnavailableError(TransientError):
    """The database did not answer (connection refused, dropped, restarted)."""


class EngineDeadError(TransientError):
    """The inference engine stopped; every batch in flight failed with this. The chunk is
    retried, and the worker process restarts with a fresh engine."""


class ApiUnreachableError(TransientError):
    """The CLI could not reach the docqueue API at all (as opposed to the API saying no)."""


# --- fatal -------------------------------------------------------------------------------------


class FatalError(DocqueueError):
    """Neither a retry nor other input helps this process; stop and say why."""


class LeaseLostError(FatalError):
    """This worker's lease on a chunk was taken over (it paused longer than ``lease_s``, or the
    lease was expired by force); its late writes are refused, and the new owner's stand."""

    status_code = 409
    code = "lease_lost"


class ConfigError(FatalError):
    """The configuration cannot start a component safely; the message says what to set."""

    code = "config_error"
