"""Prometheus metrics of the API (``GET /metrics``), read from PostgreSQL and Redis at scrape time.

Why at scrape time rather than counters kept in the API process: the API may run several
uvicorn processes, and jobs advance and finish in the workers, not in the API. Figures read from
the source of truth are the same whichever process answers the scrape, need no state shared
between processes (no ``PROMETHEUS_MULTIPROC_DIR``) and survive restarts. The queries are
aggregates over ``jobs`` (one row per job) and over the unfinished chunks only.

The ``_total`` families are sums over the job rows, which retention keeps (it purges results and
documents, not jobs), so they only grow; were job rows ever deleted, Prometheus would read the
drop as a counter reset. Workers serve their own throughput figures (``workers.metrics``).

Exposure: ``/metrics`` exists only when ``DOCQUEUE_METRICS_TOKEN`` is set (otherwise 404, so a
deployment never publishes it by accident) and then answers only ``Authorization: Bearer
<token>`` (Prometheus: ``authorization: {credentials: ...}``), compared in constant time.

Label values never come from a string a tenant chose: a job's model is whatever its submitter
typed, so the ``model`` label takes only the models workers serve (the ``workers`` registry,
which only workers write) and the default model; every other model's chunks are counted under
``other``, and no other model's Redis queue is read. A tenant submitting ten thousand model
names adds no series and no Redis round trips to a scrape.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Iterable
from typing import Annotated, Any

import redis
from fastapi import FastAPI, Header, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from service.contract import queues_for_model
from service.errors import AuthError
from service.settings import Settings
from service.store.registry import live_horizon_s
from service.store.states import JobStatus

log = logging.getLogger(__name__)

#: Job duration buckets, submission to finish: seconds to a day.
JOB_DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
#: kombu's Redis transport keeps priorities in sibling lists named queue + sep + step.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
#: The ``model`` label of every model outside the allowlist (served models, the default model).
OTHER_MODEL = "other"


class StoreCollector(Collector):
    """Collects docqueue's figures from PostgreSQL and Redis each time it is scraped."""

    def __init__(
        self, db: Engine, redis_url: str, live_horizon_s: float, default_model: str
    ) -> None:
        self.db = db
        self.default_model = default_model  # a label value even before a worker serves it
        self.live_horizon_s = live_horizon_s  # a worker silent for longer counts as gone
        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not touch the database

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "docqueue_up", "1 if the dependency answered this scrape.", labels=["dependency"]
        )
        queues: list[tuple[str, str]] = []
        try:
            families, queues = self._from_postgres()
            up.add_metric(["postgres"], 1)
            yield from families
        except Exception as exc:
            log.warning("metrics: PostgreSQL query failed: %s", exc)
            up.add_metric(["postgres"], 0)
        try:
            yield self._queue_depth(queues)
            up.add_metric(["redis"], 1)
        except Exception as exc:
            log.warning("metrics: Redis query failed: %s", exc)
            up.add_metric(["redis"], 0)
        yield up

    def _from_postgres(self) -> tuple[list[Metric], list[tuple[str, str]]]:
        bounds = ", ".join(
            f"count(*) FILTER (WHERE d <= {float(b)})" for b in JOB_DURATION_BUCKETS_S
        )
        with self.db.connect() as conn:
            by_status: dict[str, int] = {
                status: n
                for status, n in conn.execute(
                    text("SELECT status, count(*) FROM jobs GROUP BY status")
                )
            }
            sums = conn.execute(
                text(
                    "SELECT coalesce(sum(total), 0), coalesce(sum(succeeded), 0), "
                    "coalesce(sum(failed), 0), coalesce(sum(cancelled), 0), "
                    "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) "
                    "FROM jobs"
                )
            ).one()
            durations = conn.execute(
                text(
                    f"SELECT task, count(*), coalesce(sum(d), 0), {bounds} FROM ("
                    "  SELECT task, extract(epoch FROM finished_at - created_at) AS d"
                    "  FROM jobs WHERE finished_at IS NOT NULL) t GROUP BY task"
                )
            ).all()
            # The models a label may name: those workers serve (the registry, written by
            # workers only) and the default; a tenant's free-form model name is not one of them.
            served = conn.execute(text("SELECT DISTINCT model FROM workers")).scalars().all()
            allowed = sorted({*served, self.default_model})
            chunks = conn.execute(
                text(
                    "SELECT CASE WHEN j.model = ANY(:allowed) THEN j.model ELSE :other END AS m,"
                    " c.state, count(*) FROM chunks c JOIN jobs j ON j.id = c.job_id"
                    " WHERE c.state IN ('queued', 'leased') GROUP BY m, c.state"
                ),
                {"allowed": allowed, "other": OTHER_MODEL},
            ).all()
            workers = conn.execute(
                text(
                    "SELECT model, count(*) FILTER (WHERE engine_ready) FROM workers "
                    "WHERE last_heartbeat_at > now() - make_interval(secs => :h) GROUP BY model"
                ),
                {"h": self.live_horizon_s},
            ).all()
        # Both queues (interactive and bulk) of every allowed model have a series, so a
        # dashboard sees 0 rather than a gap while no bulk job exists. Only these queues are
        # read: a job's queue is a function of its model, so no other queue is listed.
        queues = [(m, q) for m in allowed for q in queues_for_model(m)]

        jobs = GaugeMetricFamily("docqueue_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status], by_status.get(status, 0))

        total, succeeded, failed, cancelled, prompt, completion = (int(v) for v in sums)
        ingested = CounterMetricFamily(
            "docqueue_documents_ingested", "Documents accepted in submitted jobs."
        )
        ingested.add_metric([], total)
        written = CounterMetricFamily(
            "docqueue_results_written",
            "Documents finished, by outcome (succeeded and failed have a result row).",
            labels=["outcome"],
        )
        for outcome, n in (("succeeded", succeeded), ("failed", failed), ("cancelled", cancelled)):
            written.add_metric([outcome], n)
        tokens = CounterMetricFamily("docqueue_tokens", "Tokens processed.", labels=["kind"])
        tokens.add_metric(["prompt"], prompt)
        tokens.add_metric(["completion"], completion)

        duration = HistogramMetricFamily(
            "docqueue_job_duration_seconds",
            "Finished jobs' time from submission to finish.",
            labels=["task"],
        )
        for task, count, total_s, *cumulative in durations:
            buckets: list[tuple[str, Any]] = [
                (str(float(b)), int(n))
                for b, n in zip(JOB_DURATION_BUCKETS_S, cumulative, strict=True)
            ]
            buckets.append(("+Inf", int(count)))
            duration.add_metric([task], buckets, float(total_s))

        pending = GaugeMetricFamily(
            "docqueue_chunks_pending",
            "Unfinished chunks per model: queued (waiting) or leased (running).",
            labels=["model", "state"],
        )
        for model, state, n in chunks:
            pending.add_metric([model, state], n)
        live = GaugeMetricFamily(
            "docqueue_workers", "Live worker processes with a ready engine.", labels=["model"]
        )
        for model, n in workers:
            live.add_metric([model], n)
        families: list[Metric] = [jobs, ingested, written, tokens, duration, pending, live]
        return families, queues

    def _queue_depth(self, queues: list[tuple[str, str]]) -> Metric:
        """Messages waiting in Redis per model queue (priority sub-queues included)."""
        depth = GaugeMetricFamily(
            "docqueue_queue_depth",
            "Chunk messages waiting in the model's Redis queue (not yet delivered).",
            labels=["model", "queue"],
        )
        if not queues:
            return depth
        pipe = self.redis.pipeline(transaction=False)
        for _, queue in queues:
            pipe.llen(queue)
            for step in _PRIORITY_STEPS:
                pipe.llen(f"{queue}{_PRIORITY_SEP}{step}")
        lengths = pipe.execute()
        per = 1 + len(_PRIORITY_STEPS)
        for i, (model, queue) in enumerate(queues):
            depth.add_metric([model, queue], sum(lengths[i * per : (i + 1) * per]))
        return depth


def install(app: FastAPI, settings: Settings, db: Engine) -> None:
    """Adds ``GET /metrics`` (Prometheus text format) when ``settings.api.metrics_token`` is
    set; without a token the route does not exist (404)."""
    token = settings.api.metrics_token
    expected = token.get_secret_value().strip().encode() if token is not None else b""
    if not expected:  # an empty token would let "Bearer " in: the same as no token
        if token is not None:
            log.warning("DOCQUEUE_METRICS_TOKEN is empty: /metrics is off")
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        StoreCollector(
            db, settings.broker.url, live_horizon_s(settings), settings.jobs.default_model
        )
    )

    lock = threading.Lock()
    cached: list[Any] = [float("-inf"), b""]  # (monotonic time made, body)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    def metrics(authorization: Annotated[str | None, Header()] = None) -> Response:
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise AuthError("/metrics needs 'Authorization: Bearer <DOCQUEUE_METRICS_TOKEN>'")
        with lock:  # one query set at a time; concurrent scrapes share its answer
            if time.monotonic() - cached[0] >= settings.api.metrics_cache_s:
                cached[1] = generate_latest(registry)
                cached[0] = time.monotonic()
            body = cached[1]
        return Response(body, media_type=CONTENT_TYPE_LATEST)
