"""The log formats (JSON and text) and the job and chunk ids they carry."""

from __future__ import annotations

import io
import json
import logging

import pytest

from service import logs


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
