"""Per-process worker state: the engine, the leases this process holds, its heartbeat.

Built once at worker start (Celery's ``worker_init``, in the main thread: vLLM spawns its
engine process and installs signal handlers there) and kept warm across jobs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field

from sqlalchemy import Engine as DbEngine

from service import logs
from service.contract import queue_for_model
from service.settings import Settings, get_settings
from service.store.chunks import Lease, PgChunkStore
from service.store.engine import get_engine
from service.store.registry import heartbeat, register_worker, unregister_worker
from workers import metrics as worker_metrics
from workers.engines import Engine, build_engine

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The chunk runner's context (``workers.runner.Context``) in a worker process."""

    settings: Settings
    model: str
    name: str
    engine: Engine
    db: DbEngine
    store: PgChunkStore
    # By lease token, not chunk id: one process may hold, lose and retake the same chunk.
    leases: dict[uuid.UUID, Lease] = field(default_factory=dict)
    lost_leases: set[uuid.UUID] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

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

    def drop(self, lease: Lease) -> None:
        with self.lock:
            self.leases.pop(lease.token, None)
            self.lost_leases.discard(lease.token)

    def lost(self, lease: Lease) -> bool:
        with self.lock:
            return lease.token in self.lost_leases

    def beat_once(self) -> None:
        """Renews this process's leases (noting those taken over) and its registration."""
        with self.lock:
            held = list(self.leases.values())
        lost = self.store.renew(held)
        if lost:
            chunks = sorted(str(x.chunk_id) for x in held if x.token in lost)
            log.warning("leases lost to other workers, chunks %s", chunks)
            with self.lock:
                self.lost_leases |= lost & self.leases.keys()
        with self.db.begin() as conn:
            heartbeat(conn, self.name, ready=True)

    def _beat_loop(self) -> None:
        interval = min(self.settings.worker.lease_s / 3.0, self.settings.worker.heartbeat_s)
        while not self.stop.wait(interval):
            try:
                self.beat_once()
            except Exception:  # database briefly away: leases have 2/3 of lease_s to spare
                log.warning("lease renewal failed; retrying", exc_info=True)

    def start(self) -> None:
        with self.db.begin() as conn:
            register_worker(
                conn,
                self.name,
                self.model,
                self.queue,
                device_label(self.engine.device),
                os.getpid(),
                True,
            )
        threading.Thread(target=self._beat_loop, name="docqueue-heartbeat", daemon=True).start()

    def shutdown(self) -> None:
        self.stop.set()
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


def start(hostname: str | None = None, settings: Settings | None = None) -> Runtime:
    """Builds the engine and registers the worker. Idempotent per process."""
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
    engine = build_engine(
        settings.engine.kind,
        model,
        max_model_len=settings.engine.max_model_len,
        gpu_memory_utilization=settings.engine.gpu_memory_utilization,
        kv_cache_gib=settings.engine.kv_cache_gib,
        max_num_seqs=settings.engine.max_num_seqs,
        dtype=settings.engine.dtype,
        enforce_eager=settings.engine.enforce_eager,
        tensor_parallel_size=settings.engine.tensor_parallel_size,
    )
    db = get_engine(settings.database.url)
    _runtime = Runtime(
        settings=settings,
        model=model,
        name=name,
        engine=engine,
        db=db,
        store=PgChunkStore.from_settings(settings, db),
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
