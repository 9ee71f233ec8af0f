"""Flower options, worker metrics ports and the log format, without any service running."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service import logs
from service.cli import app as cli_app
from service.errors import ConfigError
from service.settings import Settings, get_settings
from workers import launcher
from workers.ops import flower


def test_flower_refuses_to_start_without_credentials() -> None:
    with pytest.raises(ConfigError, match="DOCQUEUE_FLOWER_BASIC_AUTH"):
        flower.options(Settings(flower_basic_auth=None))
    with pytest.raises(ConfigError):
        flower.options(Settings(flower_basic_auth="  "))
    with pytest.raises(ConfigError, match="user:password"):
        flower.options(Settings(flower_basic_auth="admin"))
    opts = flower.options(Settings(flower_basic_auth=None), no_auth=True)
    assert opts.basic_auth is None
    assert flower.env(opts) == {"FLOWER_UNAUTHENTICATED_API": "true"}


def test_flower_options_keep_credentials_off_the_command_line(tmp_path: Path) -> None:
    s = Settings(
        flower_basic_auth="ops:s3cret",
        flower_db_path=tmp_path / "f.db",
        flower_max_tasks=500,
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


def test_each_gpu_process_gets_its_own_metrics_port() -> None:
    specs = [launcher.WorkerSpec(f"gpu{i}@%h", str(i)) for i in range(3)]
    assert launcher.with_metrics_ports(specs, None) == specs
    ported = launcher.with_metrics_ports(specs, 9100)
    ports = [launcher.child_env(s, "m", 1)["DOCQUEUE_WORKER_METRICS_PORT"] for s in ported]
    assert ports == ["9100", "9101", "9102"]


def test_json_lines_carry_context(json_log_lines: io.StringIO) -> None:
    log = logging.getLogger("docqueue.test")
    logs.set_worker("gpu0@host")
    try:
        with logs.log_context(job_id="J1", chunk_id="C1"):
            log.info("inside %s", "chunk")
            with logs.log_context(chunk_id="C2"):
                log.warning("nested")
        log.info("outside")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        logs.set_worker(None)
    lines = [json.loads(line) for line in json_log_lines.getvalue().splitlines()]
    assert [(r["message"], r["job_id"], r["chunk_id"]) for r in lines] == [
        ("inside chunk", "J1", "C1"),
        ("nested", "J1", "C2"),
        ("outside", None, None),
        ("failed", None, None),
    ]
    first = lines[0]
    assert set(first) == {"time", "level", "logger", "message", "job_id", "chunk_id", "worker"}
    assert first["level"] == "INFO" and first["logger"] == "docqueue.test"
    assert first["worker"] == "gpu0@host" and first["time"].endswith("+00:00")
    assert "RuntimeError: boom" in lines[3]["exc"]


def test_text_format_shows_context() -> None:
    config = logs.dict_config("INFO", "text")
    fmt = logging.Formatter(config["formatters"]["docqueue"]["format"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with logs.log_context(job_id="J", chunk_id="C"):
        logs.ContextFilter().filter(record)
    assert fmt.format(record).endswith("INFO x [job=J chunk=C]: hello")
    with pytest.raises(ValueError):
        logs.dict_config("INFO", "xml")


def test_celery_task_ids_give_the_log_context() -> None:
    """Chunk task ids are `<job>:<chunk index>:<suffix>` (service.contract.send_chunks)."""
    logs._task_prerun(task_id="J9:3:abcd", kwargs={"chunk_id": "C9"})
    try:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        logs.ContextFilter().filter(record)
        assert (record.__dict__["job_id"], record.__dict__["chunk_id"]) == ("J9", "C9")
    finally:
        logs._task_postrun()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    logs.ContextFilter().filter(record)
    assert (record.__dict__["job_id"], record.__dict__["chunk_id"]) == (None, None)
