"""Per-process worker state: the engine, the leases this process holds, its heartbeat.

Built once at worker start (Celery's ``worker_init``, in the main thread: vLLM spawns its
engine process and installs signal handlers there) and kept warm across jobs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, text
from sqlalchemy import Engine as DbEngine

from service import logs
from service.contract import queue_for_model
from service.settings import Settings, get_settings
from service.store.chunks import ChunkStore, Lease, PgChunkStore
from service.store.engine import get_engine
from service.store.registry import heartbeat, register_worker, unregister_worker
from service.store.states import Task
from workers import metrics as worker_metrics
from workers.engines import Batch, Engine, engine_for

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The chunk runner's context (``workers.runner.Context``) in a worker process, or in
    ``docqueue run`` (``workers.embedded``): there ``db`` is None, the store is the embedded
    one, and there is no registration to keep, only the leases."""

    settings: Settings
    model: str
    name: str
    engine: Engine
    db: DbEngine | None
    store: ChunkStore
    slots: int = 1  # chunks this process runs at once (its Celery pool's threads)
    # By lease token, not chunk id: one process may hold, lose and retake the same chunk.
    leases: dict[uuid.UUID, Lease] = field(default_factory=dict)
    lost_leases: set[uuid.UUID] = field(default_factory=set)
    # The progress deadline: when each lease was taken, the engine batches its chunk waits on,
    # the leases given up on as stalled, and when the engine last returned anything for a
    # chunk that is no longer held (all by lease token; times on the monotonic clock).
    held_since: dict[uuid.UUID, float] = field(default_factory=dict)
    batches: dict[uuid.UUID, list[Batch]] = field(default_factory=dict)
    stalled_leases: set[uuid.UUID] = field(default_factory=set)
    engine_progress_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def pg_store(self) -> PgChunkStore:
        """The service's store, which the dispatcher and the reconciler need (a worker's)."""
        if not isinstance(self.store, PgChunkStore):
            raise TypeError("the dispatcher and the reconciler run on PostgreSQL's store only")
        return self.store

    @property
    def queue(self) -> str:
        return queue_for_model(self.model)

    @property
    def sub_batch_size(self) -> int:
        return self.settings.worker.sub_batch_size

    @property
    def default_max_tokens(self) -> int:
        return self.settings.jobs.default_max_tokens

    @property
    def summary_words(self) -> int:
        return self.settings.jobs.summary_words

    @property
    def retry_backoff_s(self) -> float:
        return self.settings.worker.retry_backoff_s

    def hold(self, lease: Lease) -> None:
        with self.lock:
            self.leases[lease.token] = lease
            self.held_since[lease.token] = time.monotonic()

    def watch(self, lease: Lease, batches: Sequence[Batch]) -> None:
        """The engine batches the lease's chunk waits on: the heartbeat gives the chunk up if
        the engine returns nothing for ``progress_deadline_s`` while they are unfinished."""
        with self.lock:
            self.batches[lease.token] = list(batches)

    def drop(self, lease: Lease) -> None:
        with self.lock:
            self.leases.pop(lease.token, None)
            self.lost_leases.discard(lease.token)
            self.stalled_leases.discard(lease.token)
            self.held_since.pop(lease.token, None)
            for b in self.batches.pop(lease.token, []):
                if b.progressed_at is not None:
                    self.engine_progress_at = max(self.engine_progress_at, b.progressed_at)

    def lost(self, lease: Lease) -> bool:
        with self.lock:
            return lease.token in self.lost_leases

    def stalled(self, lease: Lease) -> bool:
        """The heartbeat gave up on this lease: its engine made no progress in time."""
        with self.lock:
            return lease.token in self.stalled_leases

    def closed(self, lease: Lease) -> None:
        """An OpenAI batch whose last chunk this was gets its output and error files now, not
        at the next reconciler pass. Native jobs cost nothing here. A failure is logged: the
        reconciler's sweep finalizes the batch later."""
        if lease.task not in (Task.CHAT, Task.COMPLETION) or self.db is None:
            return
        try:
            status = self.store.job_status(lease.job_id)
            if status is None or not status.terminal:
                return
            from service.batches import finalize

            with self.db.connect() as conn:
                batch_id = conn.execute(
                    text("SELECT id FROM batches WHERE job_id = :j"), {"j": lease.job_id}
                ).scalar()
            if batch_id is not None:
                finalize.finalize(self.db, batch_id, self.settings)
        except Exception:
            log.warning("finalizing the batch of job %s failed; the reconciler retries",
                        lease.job_id, exc_info=True)  # fmt: skip

    def _find_stalled(self, now: float) -> set[uuid.UUID]:
        """Leases waiting on unfinished engine batches while the engine returned nothing, for
        any chunk of this process, for ``progress_deadline_s`` (counted from the lease's start
        at the earliest). Engine-wide on purpose: a chunk whose requests wait their turn behind
        another chunk's that decode is not hung, and restarting the engine would throw the
        other chunk's work away. Call with ``lock`` held."""
        deadline = self.settings.worker.progress_deadline_s
        engine_last = max(
            [self.engine_progress_at]
            + [
                b.progressed_at
                for bs in self.batches.values()
                for b in bs
                if b.progressed_at is not None
            ]
        )
        return {
            token
            for token, bs in self.batches.items()
            if token not in self.stalled_leases
            and any(not b.done for b in bs)
            and now - max(self.held_since.get(token, now), engine_last) > deadline
        }

    def beat_once(self) -> None:
        """Renews this process's leases (noting those taken over) and its registration.

        A lease whose engine stopped progressing (``progress_deadline_s``) is not renewed: it
        is marked stalled, and its runner gives the chunk back at its next poll as an engine
        failure (an attempt counted, the process restarted with a fresh engine). Should the
        runner never get there, the lease expires and the reconciler re-queues the chunk."""
        with self.lock:
            stalled = self._find_stalled(time.monotonic())
            self.stalled_leases |= stalled
            held = [x for t, x in self.leases.items() if t not in self.stalled_leases]
            chunks = sorted(str(x.chunk_id) for t, x in self.leases.items() if t in stalled)
        if stalled:
            log.error(
                "engine made no progress for %.0f s; giving up chunks %s and restarting",
                self.settings.worker.progress_deadline_s,
                chunks,
            )
        lost = self.store.renew(held)
        if lost:
            chunks = sorted(str(x.chunk_id) for x in held if x.token in lost)
            log.warning("leases lost to other workers, chunks %s", chunks)
            with self.lock:
                self.lost_leases |= lost & self.leases.keys()
        if self.db is None:
            return
        with self.db.begin() as conn:
            if not heartbeat(conn, self.name, ready=True):
                log.warning("worker %s was not registered any more; registering again", self.name)
                self._register(conn)

    def _beat_loop(self) -> None:
        interval = min(self.settings.worker.lease_s / 3.0, self.settings.worker.heartbeat_s)
        while not self.stop.wait(interval):
            try:
                self.beat_once()
            except Exception:  # database briefly away: leases have 2/3 of lease_s to spare
                log.warning("lease renewal failed; retrying", exc_info=True)

    def _register(self, conn: Connection) -> None:
        register_worker(
            conn,
            self.name,
            self.model,
            self.queue,
            device_label(self.engine.device),
            os.getpid(),
            True,
            self.slots,
            caps.as_json() if (caps := self.engine.capabilities) else None,
        )

    def start(self) -> None:
        if self.db is not None:
            with self.db.begin() as conn:
                self._register(conn)
        threading.Thread(target=self._beat_loop, name="docqueue-heartbeat", daemon=True).start()

    def shutdown(self) -> None:
        self.stop.set()
        if self.db is not None:
            try:
                with self.db.begin() as conn:
                    unregister_worker(conn, self.name)
            except Exception:
                log.warning("could not unregister worker %s", self.name, exc_info=True)
        self.engine.close()


_runtime: Runtime | None = None


def device_label(engine_device: str) -> str:
    """What the worker runs on, with the GPUs it was pinned to (shown in /v1/models)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{engine_device} (CUDA_VISIBLE_DEVICES={cvd})" if cvd else engine_device


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError(
            "no engine in this process: chunk tasks run only in `docqueue worker` processes"
        )
    return _runtime


def worker_model(settings: Settings) -> str:
    model = os.environ.get("DOCQUEUE_WORKER_MODEL") or settings.jobs.default_model
    return model


def start(
    hostname: str | None = None, settings: Settings | None = None, slots: int | None = None
) -> Runtime:
    """Builds the engine and registers the worker with its ``slots`` (the Celery pool's
    concurrency; the dispatcher keeps that many chunks released for it). Idempotent."""
    global _runtime
    if _runtime is not None:
        return _runtime
    settings = settings or get_settings()
    model = worker_model(settings)
    name = hostname or f"worker@{socket.gethostname()}"
    logs.set_worker(name)
    # Metrics first: the endpoint shows engine_ready 0 during the engine's slow start.
    worker_metrics.serve(settings.worker.metrics_port, settings.worker.metrics_address)
    worker_metrics.engine_ready(model, False)
    engine = engine_for(settings, model)
    # A frozen worker's open transaction ends after a quarter lease: it must not hold its job's
    # row lock (and every other worker's progress on that job) until it wakes up.
    db = get_engine(
        settings.database.url,
        settings.database.lock_timeout_s,
        idle_in_transaction_s=settings.worker.lease_s / 4,
    )
    _runtime = Runtime(
        settings=settings,
        model=model,
        name=name,
        engine=engine,
        db=db,
        store=PgChunkStore.from_settings(settings, db),
        slots=slots or settings.worker.concurrency,
    )
    _runtime.start()
    worker_metrics.engine_ready(model, True)
    worker_metrics.worker_info(name, model, device_label(engine.device))
    return _runtime


def stop() -> None:
    global _runtime
    if _runtime is not None:
        worker_metrics.engine_ready(_runtime.model, False)
        _runtime.shutdown()
        _runtime = None
