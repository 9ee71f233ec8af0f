"""OpenAI's error shape, for the routes code written against the official ``openai`` SDK
calls (``/v1/files``, later ``/v1/batches``).

docqueue's own routes answer ``{"error": {"code", "message", ...where}}``; these answer
``{"error": {"message", "type", "param", "code"}}`` (docqueue's extra fields, such as a quota's
``limit`` and ``used``, follow), a bad parameter is a 400 as OpenAI's are, and a refusal that a
retry cannot change sends ``x-should-retry: false``: the SDK retries 409, 429 and 5xx on its own
otherwise. The app's error handlers call ``applies`` with the request's path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Path prefixes answered in OpenAI's shape.
PREFIXES = ("/v1/files", "/v1/batches")
#: A 429 whose ``Retry-After`` is at most this many seconds is left to the SDK's retries (it
#: waits as told up to about a minute); a longer one (a daily quota) is not worth retrying.
RETRY_SOON_S = 60

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def applies(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PREFIXES)


def error_type(status: int) -> str:
    """OpenAI's ``type``: ``invalid_request_error`` for a client's fault, ``server_error`` when
    docqueue or a dependency is at fault."""
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def body(status: int, native: Mapping[str, Any]) -> dict[str, Any]:
    """A docqueue error body (``DocqueueError.to_dict()``) in OpenAI's shape; the field at fault
    (``field`` or ``param``) is ``param``."""
    extra = {k: v for k, v in native.items() if k not in ("code", "message", "field", "param")}
    return {
        "message": native.get("message", ""),
        "type": error_type(status),
        "param": native.get("param", native.get("field")),
        "code": native.get("code"),
        **extra,
    }


def headers(status: int, given: Mapping[str, str] | None) -> dict[str, str]:
    """``given`` plus ``x-should-retry: false`` on a refusal a retry would meet again: any 4xx,
    except a 429 that says to come back within ``RETRY_SOON_S``."""
    out = dict(given or {})
    if 400 <= status < 500:
        retry_after = out.get("Retry-After", "")
        soon = status == 429 and retry_after.isdigit() and int(retry_after) <= RETRY_SOON_S
        if not soon:
            out["x-should-retry"] = "false"
    return out
