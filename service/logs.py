"""Logging for the API, the CLI and the workers, configured here and nowhere else.

Every record carries ``job_id``, ``chunk_id`` and ``worker`` from context variables, so a line
written deep inside the chunk pipeline (or by SQLAlchemy, Celery, vLLM) can still be traced to
its job without threading ids through every call. Context variables are per thread, and the
Celery pool runs each task in its own thread, so concurrent chunks never see each other's ids.

``DOCQUEUE_LOG_FORMAT=json`` writes one JSON object per line (time, level, logger, message,
job_id, chunk_id, worker; ``exc`` with the traceback) for log collectors; ``text`` (default) is
for people.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_chunk_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("chunk_id", default=None)
#: The worker's Celery node name (``gpu0@host``); process-wide, set once the worker knows it.
_worker: str | None = None

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"


@contextmanager
def log_context(job_id: object = None, chunk_id: object = None) -> Iterator[None]:
    """Records logged inside the block carry these ids (None leaves the outer value)."""
    tokens = []
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(str(job_id))))
    if chunk_id is not None:
        tokens.append((_chunk_id, _chunk_id.set(str(chunk_id))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_worker(name: str | None) -> None:
    """Names this process in every record (the Celery hostname; set at worker start)."""
    global _worker
    _worker = name


class ContextFilter(logging.Filter):
    """Adds ``job_id``, ``chunk_id``, ``worker`` and a text ``context`` suffix to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        job, chunk = _job_id.get(), _chunk_id.get()
        record.job_id = job
        record.chunk_id = chunk
        record.worker = _worker
        parts = [f"{k}={v}" for k, v in (("worker", _worker), ("job", job), ("chunk", chunk)) if v]
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never raises on odd messages (they are rendered with str)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "chunk_id": getattr(record, "chunk_id", None),
            "worker": getattr(record, "worker", None),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=str, ensure_ascii=False)


def dict_config(level: str | int = "INFO", fmt: str = "text") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict: one stderr handler on the root logger.

    uvicorn takes it as ``log_config`` and applies it in each of its worker processes, so
    ``docqueue api --workers N`` logs the same way in all of them. Library loggers (uvicorn,
    celery) lose their own handlers and propagate to the root, so every line has one format.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}; expected text or json")
    lvl = logging.getLevelName(level) if isinstance(level, int) else str(level).upper()
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT}
    )
    propagate = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": f"{__name__}.ContextFilter"}},
        "formatters": {"docqueue": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "docqueue",
                "filters": ["context"],
            }
        },
        "root": {"level": lvl, "handlers": ["stderr"]},
        "loggers": {
            "uvicorn": {**propagate, "level": lvl},
            "uvicorn.error": dict(propagate),
            "uvicorn.access": dict(propagate),
            "celery": dict(propagate),
            # A line per HTTP request would drown the CLI's own output.
            "httpx": {**propagate, "level": "WARNING"},
        },
    }


def configure(level: str | int | None = None, fmt: str | None = None) -> None:
    """Configures logging for this process from the arguments, else from settings."""
    from service.settings import get_settings

    s = get_settings()
    logging.config.dictConfig(dict_config(level or s.logs.level, fmt or s.logs.format))
    logging.captureWarnings(True)


def connect_celery() -> None:
    """In Celery processes: docqueue configures logging (Celery's own setup is skipped), and
    each task's lines carry its job and chunk (task ids are ``<job id>:<chunk index>:<suffix>``,
    see service.contract). The signals run in the task's own pool thread, around the task."""
    from celery.signals import setup_logging, task_postrun, task_prerun

    setup_logging.connect(_celery_setup_logging, weak=False)
    task_prerun.connect(_task_prerun, weak=False)
    task_postrun.connect(_task_postrun, weak=False)


def _celery_setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    configure(level=loglevel or None)


def _task_prerun(
    task_id: str | None = None, kwargs: dict[str, Any] | None = None, **_: Any
) -> None:
    job, sep, _rest = (task_id or "").partition(":")
    _job_id.set(job if sep else None)
    chunk = (kwargs or {}).get("chunk_id")
    _chunk_id.set(str(chunk) if chunk else None)


def _task_postrun(**_: Any) -> None:
    _job_id.set(None)
    _chunk_id.set(None)


def uvicorn_log_config() -> dict[str, Any]:
    """What ``docqueue api`` hands uvicorn (settings decide level and format)."""
    from service.settings import get_settings

    s = get_settings()
    return dict_config(s.logs.level, s.logs.format)


__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "configure",
    "connect_celery",
    "dict_config",
    "log_context",
    "set_worker",
    "uvicorn_log_config",
]
