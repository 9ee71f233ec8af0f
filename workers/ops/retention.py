"""Retention: documents and results of jobs finished more than ``retention_days`` ago are purged.

The job row stays, with its counts and tokens, and says when its results expired
(``results_expired_at``); asking for its results then answers 410. A job is marked first and
purged after, in small transactions (``retention_batch_rows`` document ids at a time), so the
purge never holds long locks and a pass cut short resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, text

from service.settings import Settings
from service.store.states import TERMINAL_STATUSES

log = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    marked: int = 0
    purged_jobs: int = 0
    documents: int = 0
    results: int = 0
    complete: bool = True
    job_ids: list[str] = field(default_factory=list)


def purge_expired(engine: Engine, settings: Settings, now: datetime | None = None) -> PurgeReport:
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=settings.retention.days)
    deadline = time.monotonic() + settings.retention.max_pass_s
    report = PurgeReport()
    with engine.begin() as conn:
        marked = conn.execute(
            text(
                "UPDATE jobs SET results_expired_at = :now WHERE results_expired_at IS NULL "
                "AND status = ANY(:terminal) AND finished_at < :cutoff RETURNING id"
            ),
            {"now": now, "cutoff": cutoff, "terminal": [str(s) for s in TERMINAL_STATUSES]},
        ).scalars()
        report.marked = len(list(marked))
        # Marked jobs that still hold rows: just marked, or left by a pass cut short.
        todo = conn.execute(
            text(
                "SELECT j.id, j.total FROM jobs j WHERE j.results_expired_at IS NOT NULL "
                "AND (EXISTS (SELECT 1 FROM documents d WHERE d.job_id = j.id) "
                "OR EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = j.id)) "
                "ORDER BY j.results_expired_at"
            )
        ).all()
    step = settings.retention.batch_rows
    for job_id, total in todo:
        last = max(int(total), _max_idx(engine, job_id))
        for start in range(1, last + 1, step):
            if time.monotonic() > deadline:
                report.complete = False
                log.info("retention: pass time is up; the next pass resumes (%s)", report)
                return report
            with engine.begin() as conn:
                bounds = {"j": job_id, "s": start, "e": start + step}
                report.results += _delete(conn, "results", bounds)
                report.documents += _delete(conn, "documents", bounds)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM chunks WHERE job_id = :j"), {"j": job_id})
        report.purged_jobs += 1
        report.job_ids.append(str(job_id))
    if report.marked or report.purged_jobs:
        log.info("retention: %s", report)
    return report


def _max_idx(engine: Engine, job_id: uuid.UUID) -> int:
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT max(idx) FROM documents WHERE job_id = :j"), {"j": job_id}
        ).scalar()
    return int(value or 0)


def _delete(conn: Connection, table: str, bounds: dict[str, object]) -> int:
    res = conn.execute(
        text(f"DELETE FROM {table} WHERE job_id = :j AND idx >= :s AND idx < :e"), bounds
    )
    return int(res.rowcount or 0)
