"""What every CLI command shares: where it prints, how it fails, and how it talks to the API.

Results go to stdout and everything else (progress, warnings, errors) to stderr, so scripts can
pipe a command's output. An error is one line and an exit code, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from service.cli.client import ApiError, Client
from service.errors import TransientError
from service.settings import Settings, get_settings

out = Console()
err = Console(stderr=True)

#: Shown instead of a URL that cannot be parsed, which could hide a password anywhere.
UNPARSEABLE_URL = "<unparseable URL>"


def fail(message: str, code: int = 1) -> NoReturn:
    """Ends the command with ``error: MESSAGE`` on stderr and exit status CODE."""
    # Escaped: API messages may hold brackets that rich would read as markup (or reject).
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


def print_json(value: Any) -> None:
    out.print_json(json.dumps(value))


def redact_url(url: str) -> str:
    """The URL with its password masked (``***``), for database and Redis URLs alike."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL, or a port that is not a number
        return UNPARSEABLE_URL


@contextmanager
def api_client() -> Iterator[Client]:
    """A client for the configured API; its errors end the command with one line, exit 1.

    "Cannot reach the API" (``ApiUnreachableError``) and "the API said no" (``ApiError``) both
    print their message; neither is worth a traceback.
    """
    s = get_settings()
    if not s.client.key:
        fail(
            "no API key: set DOCQUEUE_API_KEY "
            "(create one with `docqueue keys create --tenant NAME`)"
        )
    try:
        with Client(s.client.url, s.client.key, s.client.http_timeout_s) as client:
            yield client
    except (ApiError, TransientError) as exc:
        fail(exc.message)


def with_engine(settings: Settings, engine: str | None) -> Settings:
    """``settings`` with the engine a command's ``--engine`` names (checked, as the setting
    itself is: one of ``EngineSettings.kind``'s values)."""
    if engine is None:
        return settings
    try:
        group = settings.engine.model_validate({**settings.engine.model_dump(), "kind": engine})
    except ValidationError:
        fail(f"--engine {engine!r}: expected vllm or transformers")
    return settings.model_copy(update={"engine": group})
