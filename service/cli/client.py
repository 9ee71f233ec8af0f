"""HTTP client for the docqueue API, used by the CLI (and usable from Python).

It tells the two ways a call fails apart, because a caller does different things about them:
``ApiUnreachableError`` (a ``TransientError``: nothing answered; retry later or fix the URL) and
``ApiError`` (a ``BadInputError``: the API answered with an error status; retrying the same call
fails the same way).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from service.errors import ApiUnreachableError, BadInputError, TransientError


class ApiError(BadInputError):
    """The API answered with an error status.

    ``status_code`` is the HTTP status and ``body`` the decoded body (JSON, else text);
    ``message`` is the API's own message followed by ``(HTTP <status>)``.
    """

    def __init__(self, status_code: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class ApiUnavailableError(TransientError):
    """The API answered 5xx (its database away, a restart): worth retrying, unlike a 4xx."""

    def __init__(self, status_code: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class _ProgressReader:
    """A file wrapper that reports bytes read, so uploads can show a progress bar."""

    def __init__(self, f: IO[bytes], on_read: Callable[[int], None]) -> None:
        self._f = f
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._on_read(len(data))
        return data

    def fileno(self) -> int:
        return self._f.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


class Client:
    """One connection pool to the API; use it as a context manager so the pool is closed."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        )
        self.base_url = base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for_error(resp)
        return resp

    def _unreachable(self, exc: httpx.TransportError) -> ApiUnreachableError:
        # Some transport errors (timeouts) have an empty text; the class name still says what.
        reason = str(exc) or type(exc).__name__
        return ApiUnreachableError(f"cannot reach the docqueue API at {self.base_url}: {reason}")

    def submit(
        self,
        path: Path,
        fields: dict[str, Any],
        idempotency_key: str | None = None,
        on_upload: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        data = {k: str(v) for k, v in fields.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with path.open("rb") as f:
            body: Any = _ProgressReader(f, on_upload) if on_upload else f
            resp = self._request(
                "POST",
                "/v1/jobs",
                data=data,
                files={"file": (path.name, body, "text/csv")},
                headers=headers,
            )
        return dict(resp.json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return dict(self._request("GET", "/v1/jobs", params=params).json())

    def models(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/models").json())

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def retry(
        self, job_id: str, include_cancelled: bool = False, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"include_cancelled": include_cancelled}
        return dict(
            self._request("POST", f"/v1/jobs/{job_id}/retry", json=body, headers=headers).json()
        )

    # Collections and schedules.

    def put_documents(
        self, name: str, path: Path, fields: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        data = {k: str(v) for k, v in (fields or {}).items() if v is not None}
        with path.open("rb") as f:
            resp = self._request(
                "PUT",
                f"/v1/collections/{name}/documents",
                data=data,
                files={"file": (path.name, f, "text/csv")},
            )
        return dict(resp.json())

    def collections(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/collections").json())

    def collection(self, name: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/collections/{name}").json())

    def delete_collection(self, name: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/collections/{name}").json())

    def create_schedule(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/schedules", json=body).json())

    def schedules(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/schedules").json())

    def delete_schedule(self, schedule_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/schedules/{schedule_id}").json())

    def run_schedule(self, schedule_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/schedules/{schedule_id}/run").json())

    # Usage, quotas and administration (the admin routes need an admin key).

    def usage(self, **params: Any) -> dict[str, Any]:
        query = {k: str(v) for k, v in params.items() if v is not None}
        return dict(self._request("GET", "/v1/usage", params=query).json())

    def tenants(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/tenants").json())

    def quotas(self, tenant: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/tenants/{quote(tenant, safe='')}/quotas").json())

    def set_quotas(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        path = f"/v1/tenants/{quote(tenant, safe='')}/quotas"
        return dict(self._request("PUT", path, json=body).json())

    def workers(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/workers").json())

    def queues(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/queues").json())

    # Files (OpenAI's Files API, /v1/files).

    def upload_file(self, path: Path, expires_after_s: int | None = None) -> dict[str, Any]:
        data = {"purpose": "batch"}
        if expires_after_s is not None:
            data |= {"expires_after[anchor]": "created_at"}
            data |= {"expires_after[seconds]": str(expires_after_s)}
        with path.open("rb") as f:
            resp = self._request(
                "POST", "/v1/files", data=data, files={"file": (path.name, f, "application/jsonl")}
            )
        return dict(resp.json())

    def files(self, **params: Any) -> dict[str, Any]:
        query = {k: str(v) for k, v in params.items() if v is not None}
        return dict(self._request("GET", "/v1/files", params=query).json())

    def file(self, file_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/files/{quote(file_id, safe='')}").json())

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/files/{quote(file_id, safe='')}").json())

    def file_content(self, file_id: str) -> Iterator[bytes]:
        """Streams a file's bytes."""
        try:
            with self._http.stream("GET", f"/v1/files/{quote(file_id, safe='')}/content") as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for_error(resp)
                yield from resp.iter_bytes()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # Batches (OpenAI's Batch API, /v1/batches).

    def create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/batches", json=body).json())

    def batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/batches/{quote(batch_id, safe='')}").json())

    def results(self, job_id: str, fmt: str = "csv") -> Iterator[bytes]:
        """Streams the results; the caller writes them wherever it likes."""
        try:
            with self._http.stream(
                "GET", f"/v1/jobs/{job_id}/results", params={"format": fmt}
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for_error(resp)
                yield from resp.iter_bytes()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc


def _raise_for_error(resp: httpx.Response) -> None:
    """Raises with the API's message (docqueue's ``{"error": {"message": ...}}``, FastAPI's
    ``{"detail": ...}``, else the text): ``ApiError`` for a 4xx (the API said no),
    ``ApiUnavailableError`` for a 5xx (try again later)."""
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        message = message or (body.get("detail") if isinstance(body, dict) else None) or resp.text
    except ValueError:
        body, message = resp.text, resp.text or resp.reason_phrase
    error = ApiUnavailableError if resp.status_code >= 500 else ApiError
    raise error(resp.status_code, f"{message} (HTTP {resp.status_code})", body)
