"""Retention: documents and results of jobs finished more than ``retention_days`` ago are purged.

The job row stays, with its counts and tokens, and says when its results expired
(``results_expired_at``); asking for its results then answers 410. A job is marked first and
purged after, in small transactions (``retention_batch_rows`` document ids at a time), so the
purge never holds long locks and a pass cut short resumes where it stopped. The batches are
``service.jobs.lifecycle.purge_rows``, which also purges a deleted job after its DELETE; a
deleted job whose purge was cut short (the API stopped) is finished here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

from service.files import store as files
from service.jobs.lifecycle import purge_rows
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
                "AND deleted_at IS NULL "  # a tombstone has nothing left to expire
                "AND status = ANY(:terminal) AND finished_at < :cutoff RETURNING id"
            ),
            {"now": now, "cutoff": cutoff, "terminal": [str(s) for s in TERMINAL_STATUSES]},
        ).scalars()
        report.marked = len(list(marked))
        # Marked jobs that still hold rows: just marked, or left by a pass cut short; and
        # deleted jobs whose purge after the DELETE was cut short (the API stopped).
        todo = (
            conn.execute(
                text(
                    "SELECT j.id FROM jobs j "
                    "WHERE (j.results_expired_at IS NOT NULL OR j.deleted_at IS NOT NULL) "
                    "AND (EXISTS (SELECT 1 FROM documents d WHERE d.job_id = j.id) "
                    "OR EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = j.id)) "
                    "ORDER BY coalesce(j.results_expired_at, j.deleted_at)"
                )
            )
            .scalars()
            .all()
        )
    for job_id in todo:
        purged = purge_rows(engine, job_id, settings.retention.batch_rows, deadline)
        report.results += purged.results
        report.documents += purged.documents
        if not purged.complete:
            report.complete = False
            log.info("retention: pass time is up; the next pass resumes (%s)", report)
            return report
        report.purged_jobs += 1
        report.job_ids.append(str(job_id))
    if report.marked or report.purged_jobs:
        log.info("retention: %s", report)
    return report


def purge_expired_files(
    engine: Engine, settings: Settings, now: datetime | None = None
) -> files.PurgeReport:
    """Files of the Files API (``/v1/files``) past their ``expires_at``, batch inputs and
    outputs alike (and outputs a writer abandoned), their parts ``DOCQUEUE_FILE_PURGE_BATCH_PARTS``
    per transaction. Apart from jobs' retention: a file's life is its own ``expires_after``,
    not ``retention_days``."""
    report = files.purge_expired(engine, settings, now)
    if report.files or not report.complete:
        log.info("retention: expired files: %s", report)
    return report
