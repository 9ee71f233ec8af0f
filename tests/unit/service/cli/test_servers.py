"""`docqueue flower` (service/cli/servers.py): refuses to start without basic auth."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.settings import get_settings


@pytest.fixture()
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_flower_without_auth_exits_non_zero(fresh_settings: None) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["flower"],
        env={"DOCQUEUE_FLOWER_BASIC_AUTH": ""},
    )
    assert result.exit_code == 2
    assert "DOCQUEUE_FLOWER_BASIC_AUTH" in result.output
