"""The embedded runner: ``docqueue run``'s chunks, engine and store in one process, no server.

The same chunk runner (``workers.runner.process_chunk``) and the same per-process state
(``workers.runtime.Runtime``: leases, their renewal, the progress deadline) as a worker, over
the embedded store (``service.store.sqlite``) instead of PostgreSQL and with no broker: the
chunks of the one job are taken in order by ``concurrency`` threads, so the engine always has
the next chunk's prompts while earlier ones decode, as a worker's Celery threads give it.

A run that starts expires every lease in its store: the file is locked by one run at a time,
so any lease in it belonged to a run that died (Ctrl-C, kill -9, a power cut). Its rows that
have a result are never run again; the others are.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from service.errors import ConflictError, EngineDeadError
from service.store.sqlite import SqliteChunkStore
from service.store.states import JobStatus
from workers.runner import RetryChunk, process_chunk
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a run ended: the job's status, or why it stopped before the end (``stopped``)."""

    status: JobStatus
    stopped: str | None = None


def run_job(
    rt: Runtime,
    store: SqliteChunkStore,
    job_id: uuid.UUID,
    *,
    concurrency: int,
    stop: threading.Event,
    on_chunk: Callable[[], None] | None = None,
) -> Outcome:
    """Runs every open chunk of the job; returns when all are closed, or when ``stop`` is set
    (Ctrl-C) or the engine died (the rest waits for the next run). A chunk given back after a
    transient failure is retried by its thread after the backoff the runner chose."""
    store.expire(every_lease=True)
    todo: queue.SimpleQueue[uuid.UUID] = queue.SimpleQueue()
    for chunk_id in store.open_chunks(job_id):
        todo.put(chunk_id)
    failure: list[str] = []

    def work() -> None:
        while not stop.is_set():
            try:
                chunk_id = todo.get_nowait()
            except queue.Empty:
                return
            while not stop.is_set():
                try:
                    process_chunk(rt, chunk_id)
                    break
                except RetryChunk as exc:
                    if isinstance(exc.cause, EngineDeadError):
                        failure.append(f"the engine failed: {exc.cause}")
                        stop.set()
                        return
                    if exc.countdown_s is None:
                        break  # closed failed, its rows carry the reason
                    log.warning("chunk %s: retrying in %.1f s: %s", chunk_id, exc.countdown_s, exc)
                    stop.wait(exc.countdown_s)
                except Exception as exc:  # the store is away (disk full, file removed)
                    failure.append(f"{type(exc).__name__}: {exc}")
                    stop.set()
                    return
            if on_chunk is not None:
                on_chunk()

    threads = [
        threading.Thread(target=work, name=f"docqueue-run-{n}", daemon=True)
        for n in range(max(1, concurrency))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = store.job_status(job_id) or JobStatus.FAILED
    if failure:
        return Outcome(status, failure[0])
    if not status.terminal:
        return Outcome(status, "interrupted")
    return Outcome(status)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One run at a time per store: a lock on ``<store>.lock`` (released by the kernel
    however the holder ends). A second run is refused with a message naming the file."""
    lock_path = path.with_name(path.name + ".lock")
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(
                f"another docqueue run is using {path} (locked: {lock_path})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start_reaper() -> None:
    """A small child process that outlives this one by a moment: when this process ends
    however it ends (kill -9 included), it SIGKILLs the processes this one had started (the
    engine's), which would otherwise run on, orphaned, holding the GPU. It learns this
    process's death from a pipe whose write end only this process holds, and its descendants
    from /proc, read every half second while it lives."""
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid()), str(read_end)],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # not in our process group: a Ctrl-C does not reach it
    )
    os.close(read_end)
    # The write end stays open until this process ends: never inherited, never closed.
    os.set_inheritable(write_end, False)
    _REAPER_FDS.append(write_end)


_REAPER_FDS: list[int] = []

_REAPER = r"""
import os, select, signal, sys, time

parent, fd = int(sys.argv[1]), int(sys.argv[2])
me = os.getpid()

def children_of():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        kids.setdefault(int(fields[1]), []).append((int(name), fields[19]))
    return kids

def descendants():
    kids, out, todo = children_of(), [], [parent]
    while todo:
        for pid, started in kids.get(todo.pop(), []):
            if pid != me:
                out.append((pid, started))
                todo.append(pid)
    return out

known = []
while True:
    ready, _, _ = select.select([fd], [], [], 0.5)
    if ready and not os.read(fd, 1):
        break
    known = descendants() or known
for pid, started in known:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        if stat[stat.rindex(")") + 2 :].split()[19] == started:  # not a reused pid
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
"""


def install_sigterm() -> None:
    """SIGTERM ends a run like Ctrl-C does (KeyboardInterrupt), so its engine is closed."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
