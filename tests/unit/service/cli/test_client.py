"""The CLI's HTTP client against real sockets: "cannot reach the API" is a ``TransientError``
(``ApiUnreachableError``), "the API said no" an ``ApiError`` (a ``BadInputError``) with the
status and the API's message; and the CLI prints either as one ``error:`` line, exit 1."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.cli.client import ApiError, ApiUnavailableError, Client
from service.cli.output import UNPARSEABLE_URL, redact_url
from service.errors import (
    ApiUnreachableError,
    BadInputError,
    DocqueueError,
    NotFoundError,
    StoreUnavailableError,
    TransientError,
)
from service.settings import get_settings

MISSING_JOB = "0b7c5c1e-0000-4000-8000-000000000000"
NOT_FOUND = NotFoundError(f"job {MISSING_JOB} not found")


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connecting is refused, and no one else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


class _NotFoundHandler(BaseHTTPRequestHandler):
    """Answers every request as the API answers for a job that does not exist."""

    error: DocqueueError = NOT_FOUND

    def _answer(self) -> None:
        body = json.dumps({"error": self.error.to_dict()}).encode()
        self.send_response(self.error.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass


class _UnavailableHandler(_NotFoundHandler):
    """Answers as the API does while its database is away."""

    error = StoreUnavailableError("database unavailable; retry later")


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on a free port, answering with ``handler``; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def unavailable_api() -> Iterator[str]:
    yield from _serve(_UnavailableHandler)


def test_a_5xx_answer_is_transient_not_bad_input(unavailable_api: str) -> None:
    with Client(unavailable_api, "dq_test") as client, pytest.raises(TransientError) as info:
        client.job(MISSING_JOB)
    exc = info.value
    assert isinstance(exc, ApiUnavailableError) and not isinstance(exc, BadInputError)
    assert exc.status_code == 503
    assert exc.message == "database unavailable; retry later (HTTP 503)"


@pytest.fixture()
def not_found_api() -> Iterator[str]:
    yield from _serve(_NotFoundHandler)


def test_a_closed_port_is_unreachable_not_an_api_error(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    with Client(url, "dq_test", timeout_s=5) as client:
        with pytest.raises(ApiUnreachableError) as info:
            client.job(MISSING_JOB)
        with pytest.raises(ApiUnreachableError) as streamed:
            list(client.results(MISSING_JOB))  # the streaming path says the same
    for exc in (info.value, streamed.value):
        assert isinstance(exc, TransientError) and not isinstance(exc, ApiError)
        assert exc.message.startswith(f"cannot reach the docqueue API at {url}: ")


def test_a_server_that_never_answers_is_unreachable(silent_port: int) -> None:
    with (
        Client(f"http://127.0.0.1:{silent_port}", "dq_test", timeout_s=0.3) as client,
        pytest.raises(ApiUnreachableError) as info,
    ):
        client.models()
    assert "cannot reach the docqueue API" in info.value.message
    assert not info.value.message.endswith(": ")  # a timeout's empty text is replaced


def test_an_error_status_is_an_api_error_with_status_body_and_message(not_found_api: str) -> None:
    with Client(not_found_api, "dq_test") as client:
        with pytest.raises(ApiError) as info:
            client.job(MISSING_JOB)
        with pytest.raises(ApiError) as streamed:
            list(client.results(MISSING_JOB))
    for exc in (info.value, streamed.value):
        assert isinstance(exc, BadInputError) and not isinstance(exc, TransientError)
        assert exc.status_code == 404
        assert exc.message == f"job {MISSING_JOB} not found (HTTP 404)"
        assert exc.body == {"error": NOT_FOUND.to_dict()}


@pytest.fixture()
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _cli(api_url: str, *args: str) -> tuple[int, str, BaseException | None]:
    env = {"DOCQUEUE_API_URL": api_url, "DOCQUEUE_API_KEY": "dq_test", "COLUMNS": "200"}
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, " ".join(result.output.split()), result.exception


def test_the_cli_prints_one_error_line_for_an_unreachable_api(
    fresh_settings: None, closed_port: int
) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    code, output, exc = _cli(url, "status", MISSING_JOB)
    assert code == 1 and isinstance(exc, SystemExit)  # typer.Exit, not the client's error
    assert output.startswith(f"error: cannot reach the docqueue API at {url}: ")
    assert "Traceback" not in output


def test_the_cli_prints_the_api_message_for_an_error_status(
    fresh_settings: None, not_found_api: str
) -> None:
    for args in (("status", MISSING_JOB), ("results", MISSING_JOB), ("cancel", MISSING_JOB)):
        code, output, exc = _cli(not_found_api, *args)
        assert code == 1 and isinstance(exc, SystemExit), args
        assert output == f"error: job {MISSING_JOB} not found (HTTP 404)", args


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://docqueue:s3cr%40t@db.internal:5432/docqueue",
            "postgresql+psycopg://docqueue:***@db.internal:5432/docqueue",
        ),
        ("redis://:r3d-pass@redis:6379/0", "redis://:***@redis:6379/0"),  # password only
        ("rediss://default:r3d-pass@redis:6380/1", "rediss://default:***@redis:6380/1"),
        (
            "postgresql+psycopg://postgres@127.0.0.1:5432/db",
            "postgresql+psycopg://postgres@127.0.0.1:5432/db",
        ),
        ("redis://127.0.0.1:6379/15", "redis://127.0.0.1:6379/15"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["not a url", "redis://u:s3cret@redis:port/0", ""])
def test_an_unparseable_url_is_not_shown_at_all(url: str) -> None:
    assert redact_url(url) == UNPARSEABLE_URL
