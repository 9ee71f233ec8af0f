"""Submissions run in a small pool of processes, off the API's serving threads.

Ingest parses CSV and builds ``COPY`` lines in Python: in a serving thread it holds the GIL for
the whole upload, and every status poll of every tenant waits behind it (measured: status p99
of 1.3 s with 50 clients uploading, ``scripts/bench/load.py``). A process per core takes that
work, so the serving process only moves bytes and answers reads; the pool's size also bounds how
many uploads are parsed at once, and the rest wait their turn without holding a thread busy.

The upload never travels through a pipe: the API process keeps the spooled file open and the
pool process opens the same file through ``/proc/<api pid>/fd/<n>`` (Linux, same user), so an
8 GiB upload is not copied. Errors come back as data and are raised again in the API process
with their type, message and location, so the client sees the same 4xx as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import IO, Any

from sqlalchemy.exc import InterfaceError, OperationalError

from service import logs
from service.errors import DocqueueError, StoreUnavailableError
from service.jobs.validate import JobRequest
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Failure:
    """A DocqueueError as plain data: pickling the exception itself would lose ``where``."""

    cls: type[DocqueueError]
    message: str
    where: dict[str, Any]

    def rebuild(self) -> DocqueueError:
        exc = self.cls.__new__(self.cls)
        DocqueueError.__init__(exc, self.message, **self.where)
        return exc


class _Capture(logging.Handler):
    """Keeps a pool process's log records, made picklable, for the API process to emit: its
    logs (format, destination, job ids) stay the one place a submission is logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        logs.ContextFilter().filter(record)  # job_id and chunk_id from this process's context
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self.records.append(record)


_Outcome = tuple[uuid.UUID, bool] | _Failure


def _create_job(
    tenant_id: uuid.UUID, req: JobRequest, path: str, settings: Settings
) -> tuple[_Outcome, list[logging.LogRecord]]:
    """Runs in a pool process: the whole submission, in its own transaction."""
    from service.jobs.submit import create_job

    root, capture = logging.getLogger(), _Capture()
    root.setLevel(settings.logs.level)
    root.addHandler(capture)
    try:
        with open(path, "rb") as upload:
            job, created = create_job(tenant_id, req, upload, settings)
        return (job.id, created), capture.records
    except DocqueueError as exc:
        return _Failure(type(exc), exc.message, exc.where), capture.records
    except (OperationalError, InterfaceError) as exc:
        log.warning("database unavailable during a submission: %s", exc)
        failure = _Failure(StoreUnavailableError, "database unavailable; retry later", {})
        return failure, capture.records
    finally:
        root.removeHandler(capture)


def _outcome(result: tuple[_Outcome, list[logging.LogRecord]]) -> tuple[uuid.UUID, bool]:
    """Emits the pool process's log lines here, then returns or raises its outcome."""
    outcome, records = result
    for record in records:
        with logs.log_context(job_id=getattr(record, "job_id", None)):
            logging.getLogger(record.name).handle(record)
    if isinstance(outcome, _Failure):
        raise outcome.rebuild()
    return outcome


def _lower_priority() -> None:
    """Pool processes yield the CPU to the serving process: a status poll waiting behind an
    upload's parsing is the latency users see; the upload itself barely slows down."""
    with contextlib.suppress(OSError):  # not permitted: run at the same priority
        os.nice(10)


def _log_failure(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("sending chunk messages from the submit pool failed: %s", exc)


def _start() -> None:
    """Each pool process, at its start: a lower priority, then the submission path and the
    readers' libraries imported (pyarrow alone takes most of a second), so no upload pays for
    them, whichever process it lands in."""
    _lower_priority()
    _end_with_parent(os.getppid())
    import service.jobs.submit  # noqa: F401

    with contextlib.suppress(ImportError):  # Parquet uploads would then say what is missing
        import pyarrow.parquet  # noqa: F401


def _end_with_parent(parent: int, every_s: float = 1.0) -> None:
    """The process ends once the API process is gone, however it ended: a pool process whose
    parent was SIGKILLed (or whose shutdown was cut short) would wait forever on a queue no
    one writes, holding its memory, one pair more at every restart. A thread that notices the
    new parent, where ``PR_SET_PDEATHSIG`` would fire when the spawning *thread* ends."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(0)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _warm() -> int:
    """Starts a pool process (the executor spawns them on demand)."""
    return os.getpid()


def _shareable_path(upload: IO[bytes]) -> str:
    """A path another process of this user can open to read ``upload`` from its start."""
    rollover = getattr(upload, "rollover", None)
    if rollover is not None:  # a SpooledTemporaryFile still in memory goes to its disk file
        rollover()
    upload.flush()
    return f"/proc/{os.getpid()}/fd/{upload.fileno()}"


class SubmitPool:
    """``create_job`` in ``processes`` worker processes (0: in the calling thread)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        if processes > 0:
            # spawn, not fork: the API process has threads (and a database pool) by now.
            self._pool = ProcessPoolExecutor(
                max_workers=processes, mp_context=get_context("spawn"), initializer=_start
            )
            self._warming: list[Future[int]] = [self._pool.submit(_warm) for _ in range(processes)]

    def create_job(
        self, tenant_id: uuid.UUID, req: JobRequest, upload: IO[bytes], settings: Settings
    ) -> tuple[uuid.UUID, bool]:
        """(job id, created); raises what ``service.jobs.submit.create_job`` raises."""
        if self._pool is None:
            from service.jobs.submit import create_job

            job, created = create_job(tenant_id, req, upload, settings)
            return job.id, created
        path = _shareable_path(upload)
        return _outcome(self._pool.submit(_create_job, tenant_id, req, path, settings).result())

    async def create_job_async(
        self, tenant_id: uuid.UUID, req: JobRequest, upload: IO[bytes], settings: Settings
    ) -> tuple[uuid.UUID, bool]:
        """The same, awaited: no thread waits while the upload queues for a pool process."""
        if self._pool is None:
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(self.create_job, tenant_id, req, upload, settings)
        path = _shareable_path(upload)
        future = self._pool.submit(_create_job, tenant_id, req, path, settings)
        return _outcome(await asyncio.wrap_future(future))

    def enqueue_later(self, job_id: uuid.UUID, settings: Settings) -> bool:
        """Runs the dispatcher for the job's model in a pool process, not waited for (a crash
        in between leaves the chunks waiting for the next pass). False without a pool: the
        caller dispatches."""
        if self._pool is None:
            return False
        from service.jobs.submit import enqueue_job

        future = self._pool.submit(enqueue_job, job_id, settings)
        future.add_done_callback(_log_failure)
        return True

    def later(self, fn: Callable[..., object], *args: object) -> bool:
        """Runs ``fn(*args)`` in a pool process, not waited for (work that follows a response,
        such as reading a batch's file). False without a pool: the caller runs it."""
        if self._pool is None:
            return False
        future = self._pool.submit(fn, *args)
        future.add_done_callback(_log_failure)
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def default_processes() -> int:
    """One per core the API may use, at least one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_shared: dict[int, SubmitPool] = {}
_shared_lock = threading.Lock()


def shared(settings: Settings) -> SubmitPool:
    """This process's pool for ``settings.api.submit_processes`` (made once, on first use)."""
    n = settings.api.submit_processes
    n = default_processes() if n is None else n
    with _shared_lock:
        if n not in _shared:
            _shared[n] = SubmitPool(n)
        return _shared[n]
