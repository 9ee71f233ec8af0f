"""Prometheus metrics of one worker process (``docqueue worker --metrics-port N``).

Multi-process safety: ``docqueue worker`` runs one Celery process per GPU, and each process
serves its own registry on its own port, ``N + i`` for the launcher's i-th process (see
``workers.launcher``), so Prometheus scrapes every GPU's figures and no process ever reports
another's. Within a process, chunks run on Celery's thread pool and prometheus_client's metrics
are thread-safe, so no multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) is needed. A process the
launcher restarts starts its counters from zero again, which ``rate()`` reads as a reset.

Documents/s and output tokens/s are counters (use ``rate()``), plus gauges over the last minute
for anyone reading the endpoint by hand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.errors import EngineDeadError

if TYPE_CHECKING:
    from service.store.chunks import Written

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
#: Window of the per-second gauges.
RATE_WINDOW_S = 60.0

DOCUMENTS = Counter(
    "docqueue_worker_documents",
    "Documents this process finished, by outcome (succeeded: a result; failed: a row error).",
    ["model", "task", "outcome"],
    registry=REGISTRY,
)
OUTPUT_TOKENS = Counter(
    "docqueue_worker_output_tokens",
    "Completion tokens this process generated.",
    ["model", "task"],
    registry=REGISTRY,
)
CHUNK_SECONDS = Histogram(
    "docqueue_worker_chunk_duration_seconds",
    "Wall time of one chunk task, claim to close, by outcome (done, cancelled, error, busy...).",
    ["model", "outcome"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
CHUNKS_IN_FLIGHT = Gauge(
    "docqueue_worker_chunks_in_flight",
    "Chunk tasks running in this process now.",
    ["model"],
    registry=REGISTRY,
)
ENGINE_READY = Gauge(
    "docqueue_worker_engine_ready",
    "1 once this process's engine is built and serving; 0 while it loads or after it died.",
    ["model"],
    registry=REGISTRY,
)
INFO = Gauge(
    "docqueue_worker_info",
    "Always 1; names the process (Celery hostname), its model and device.",
    ["worker", "model", "device"],
    registry=REGISTRY,
)


class _Rates(Collector):
    """Documents/s and output tokens/s over the last ``RATE_WINDOW_S``, computed at scrape."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, str, int, int]] = deque()
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def add(self, model: str, documents: int, tokens: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), model, documents, tokens))

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        span = max(min(RATE_WINDOW_S, now - self._started), 1.0)
        docs: dict[str, int] = {}
        toks: dict[str, int] = {}
        with self._lock:
            while self._events and self._events[0][0] < now - RATE_WINDOW_S:
                self._events.popleft()
            for _, model, d, t in self._events:
                docs[model] = docs.get(model, 0) + d
                toks[model] = toks.get(model, 0) + t
        help_ = f"over the last {RATE_WINDOW_S:.0f} s (or since start)"
        d_fam = GaugeMetricFamily(
            "docqueue_worker_documents_per_second",
            f"Documents finished per second {help_}.",
            labels=["model"],
        )
        t_fam = GaugeMetricFamily(
            "docqueue_worker_output_tokens_per_second",
            f"Output tokens per second {help_}.",
            labels=["model"],
        )
        for model in docs:
            d_fam.add_metric([model], docs[model] / span)
            t_fam.add_metric([model], toks[model] / span)
        yield d_fam
        yield t_fam

    def describe(self) -> Iterable[Metric]:
        return []


RATES = _Rates()
REGISTRY.register(RATES)

_served_port: int | None = None


def serve(port: int | None, address: str = "0.0.0.0") -> int | None:
    """Starts this process's /metrics endpoint (once per process); None: metrics stay off.

    A taken port costs the metrics, not the worker: a GPU must not sit idle (and the launcher
    restart it forever) because another process on the host holds the port."""
    global _served_port
    if port is None or _served_port is not None:
        return _served_port
    try:
        start_http_server(port, addr=address, registry=REGISTRY)
    except OSError as exc:
        log.error("worker metrics off: cannot serve on %s:%d: %s", address, port, exc)
        return None
    _served_port = port
    log.info("worker metrics on http://%s:%d/metrics", address, port)
    return port


def engine_ready(model: str, ready: bool) -> None:
    ENGINE_READY.labels(model).set(1 if ready else 0)


def worker_info(name: str, model: str, device: str) -> None:
    INFO.labels(name, model, device).set(1)


@dataclass
class ChunkRun:
    """What the chunk task reports back to ``observe_chunk`` (its outcome string)."""

    outcome: str = "error"


@contextmanager
def observe_chunk(model: str) -> Iterator[ChunkRun]:
    """Times one chunk task and keeps the in-flight gauge; the task sets ``outcome``."""
    run = ChunkRun()
    CHUNKS_IN_FLIGHT.labels(model).inc()
    started = time.monotonic()
    try:
        yield run
    except BaseException as exc:
        run.outcome = "error"
        if isinstance(exc, EngineDeadError):
            engine_ready(model, False)
        raise
    finally:
        CHUNKS_IN_FLIGHT.labels(model).dec()
        CHUNK_SECONDS.labels(model, run.outcome).observe(time.monotonic() - started)


def count_written(model: str, task: str, written: Written) -> None:
    """Counts the rows one result write inserted, as it happens (so documents/s moves during a
    long chunk). Only inserted rows count: a redelivered chunk's rows that already had results,
    or a duplicate delivery that claimed nothing, add nothing."""
    if written.succeeded:
        DOCUMENTS.labels(model, task, "succeeded").inc(written.succeeded)
    if written.failed:
        DOCUMENTS.labels(model, task, "failed").inc(written.failed)
    if written.completion_tokens:
        OUTPUT_TOKENS.labels(model, task).inc(written.completion_tokens)
    RATES.add(model, written.succeeded + written.failed, written.completion_tokens)
