"""Flower's options: credentials required, and kept off the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import ConfigError
from service.settings import FlowerSettings, Settings
from workers.ops import flower


def test_flower_refuses_to_start_without_credentials() -> None:
    with pytest.raises(ConfigError, match="DOCQUEUE_FLOWER_BASIC_AUTH"):
        flower.options(Settings(flower=FlowerSettings(basic_auth=None)))
    with pytest.raises(ConfigError):
        flower.options(Settings(flower=FlowerSettings(basic_auth="  ")))
    with pytest.raises(ConfigError, match="user:password"):
        flower.options(Settings(flower=FlowerSettings(basic_auth="admin")))
    opts = flower.options(Settings(flower=FlowerSettings(basic_auth=None)), no_auth=True)
    assert opts.basic_auth is None
    assert flower.env(opts) == {"FLOWER_UNAUTHENTICATED_API": "true"}


def test_flower_options_keep_credentials_off_the_command_line(tmp_path: Path) -> None:
    s = Settings(
        flower=FlowerSettings(basic_auth="ops:s3cret", db_path=tmp_path / "f.db", max_tasks=500)
    )
    opts = flower.options(s, port=5600, address="0.0.0.0", persistent=True)
    args = flower.argv(opts)
    assert args[:3] == ["-A", "workers.ops.flower", "flower"]
    assert "--port=5600" in args and "--address=0.0.0.0" in args and "--max_tasks=500" in args
    assert "--persistent=True" in args and f"--db={tmp_path / 'f.db'}" in args
    assert not any("s3cret" in a for a in args)
    assert flower.env(opts) == {"FLOWER_BASIC_AUTH": "ops:s3cret"}
    defaults = flower.argv(flower.options(s))  # persistent unless told otherwise
    assert "--port=5555" in defaults and "--persistent=True" in defaults
    assert "--max_tasks=500" in defaults
    transient = flower.argv(flower.options(s, persistent=False))
    assert not any(a.startswith(("--persistent", "--db")) for a in transient)
