"""The chunk task: lease a chunk, run its documents through the engine, write results.

Per-document problems become that row's error; transient problems (database away, engine dead)
give the chunk back and retry it with backoff, up to ``max_attempts``; then its unfinished rows
fail with the reason. A redelivered or duplicated message is harmless: the lease admits one
runner, and results are unique per document.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.signals import worker_init, worker_ready, worker_shutdown
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError

from service.queue import TASK_RUN_CHUNK
from service.work import (
    Doc,
    Lease,
    RowResult,
    claim_chunk,
    close_chunk,
    pending_documents,
    release_chunk,
    write_results,
)
from workers import metrics as worker_metrics
from workers import runtime
from workers.app import app
from workers.engines import Batch, GenRequest
from workers.engines.vllm_engine import EngineDeadError
from workers.prompts import RowError, render

log = logging.getLogger(__name__)
_CANCEL_POLL_S = 2.0
_TRANSIENT = (OperationalError, InterfaceError, EngineDeadError, ConnectionError, TimeoutError)


@dataclass
class _Group:
    """One engine sub-batch of a chunk: which documents went in, which failed before it."""

    docs: list[Doc]
    prepared: list[tuple[int, bool]]  # (position in docs, truncated) of rows sent to the engine
    errors: dict[int, str]  # position in docs -> row error found while rendering
    batch: Batch
    submitted_at: float


def _generation(lease: Lease, tokenizer: Any, default_max_tokens: int) -> dict[str, Any]:
    params = lease.params
    labels = tuple(params.get("labels") or ()) if lease.task == "classify" else None
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        if labels:
            longest = max(len(tokenizer(lab, add_special_tokens=False).input_ids) for lab in labels)
            max_tokens = longest + 4
        else:
            max_tokens = default_max_tokens
    return {
        "max_tokens": int(max_tokens),
        "temperature": float(params.get("temperature", 0.0)),
        "seed": params.get("seed"),
        "choices": labels,
    }


def process_chunk(rt: runtime.Runtime, chunk_id: uuid.UUID) -> str:
    """Runs one chunk; returns what happened ("done", "cancelled", "busy", ...)."""
    s = rt.settings
    with rt.db.begin() as conn:
        claim = claim_chunk(conn, chunk_id, rt.name, s.lease_s)
        if claim.lease is None:
            if claim.reason == "job_cancelled" and claim.job_id is not None:
                close_chunk(conn, chunk_id, claim.job_id, "cancelled")
            return claim.reason
        lease = claim.lease
        if lease.attempts > s.max_attempts:
            close_chunk(
                conn,
                chunk_id,
                lease.job_id,
                "failed",
                f"gave up after {s.max_attempts} attempts",
            )
            return "failed"
        docs = pending_documents(conn, lease)
    rt.hold(chunk_id)
    try:
        return _run(rt, lease, docs)
    finally:
        rt.drop(chunk_id)


def _run(rt: runtime.Runtime, lease: Lease, docs: list[Doc]) -> str:
    s = rt.settings
    engine = rt.engine
    if lease.model != rt.model:  # a message on the wrong queue: give it back untouched
        with rt.db.begin() as conn:
            release_chunk(conn, lease.chunk_id, rt.name, f"worker serves {rt.model}")
        return "wrong_model"
    tokenizer = engine.tokenizer()
    gen = _generation(lease, tokenizer, s.default_max_tokens)
    budget = engine.max_model_len - gen["max_tokens"]
    params = {"summary_words": s.summary_words, **lease.params}

    # Render and submit every sub-batch up front: the engine then always has this chunk's next
    # prompts queued while earlier ones decode.
    groups: list[_Group] = []
    for start in range(0, len(docs), s.sub_batch_size):
        part = docs[start : start + s.sub_batch_size]
        prepared: list[tuple[int, bool]] = []
        requests: list[GenRequest] = []
        errors: dict[int, str] = {}
        for pos, doc in enumerate(part):
            try:
                r = render(tokenizer, lease.task, params, doc, budget)
            except RowError as exc:
                errors[pos] = str(exc)
                continue
            prepared.append((pos, r.truncated))
            requests.append(GenRequest(prompt_token_ids=r.token_ids, **gen))
        groups.append(_Group(part, prepared, errors, engine.submit(requests), time.monotonic()))

    for n, group in enumerate(groups):
        last_poll = time.monotonic()
        while not group.batch.wait(0.5):
            if time.monotonic() - last_poll >= _CANCEL_POLL_S:
                last_poll = time.monotonic()
                if _job_cancelled(rt, lease.job_id):
                    return _cancel_rest(rt, lease, groups[n:])
        if group.batch.failure is not None:
            for g in groups[n + 1 :]:
                engine.cancel(g.batch)
            raise group.batch.failure
        results = _row_results(group, lease.attempts, gen["choices"])
        with rt.db.begin() as conn:
            written = write_results(conn, lease.job_id, results)
        worker_metrics.count_written(rt.model, lease.task, written)
        if written.status in ("cancelling", "cancelled") and n + 1 < len(groups):
            return _cancel_rest(rt, lease, groups[n + 1 :])
    with rt.db.begin() as conn:
        close_chunk(conn, lease.chunk_id, lease.job_id, "done")
    return "done"


def _row_results(group: _Group, attempts: int, labels: tuple[str, ...] | None) -> list[RowResult]:
    elapsed_ms = (time.monotonic() - group.submitted_at) * 1000.0
    out: list[RowResult] = []
    for pos, message in group.errors.items():
        out.append(RowResult(idx=group.docs[pos].idx, error=message, attempts=attempts))
    for k, (pos, truncated) in enumerate(group.prepared):
        res = group.batch.results[k]
        assert res is not None
        idx = group.docs[pos].idx
        if res.error:
            out.append(
                RowResult(
                    idx=idx, error=res.error, prompt_tokens=res.prompt_tokens, attempts=attempts
                )
            )
            continue
        label = res.text.strip() if labels else None
        if labels and label not in labels:  # cut off by max_tokens before a label completed
            out.append(
                RowResult(
                    idx=idx,
                    output=res.text,
                    error=f"no label: output {res.text!r} "
                    f"is not one of {list(labels)} (raise max_tokens?)",
                    prompt_tokens=res.prompt_tokens,
                    attempts=attempts,
                )
            )
            continue
        out.append(
            RowResult(
                idx=idx,
                output=res.text,
                label=label,
                confidence=res.confidence,
                finish_reason=res.finish_reason,
                prompt_tokens=res.prompt_tokens,
                completion_tokens=res.completion_tokens,
                truncated=truncated,
                attempts=attempts,
                latency_ms=elapsed_ms,
            )
        )
    out.sort(key=lambda r: r.idx)
    return out


def _job_cancelled(rt: runtime.Runtime, job_id: uuid.UUID) -> bool:
    with rt.db.connect() as conn:
        status = conn.execute(text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id})
        return status.scalar() in ("cancelling", "cancelled")


def _cancel_rest(rt: runtime.Runtime, lease: Lease, groups: list[_Group]) -> str:
    for g in groups:
        rt.engine.cancel(g.batch)
    with rt.db.begin() as conn:
        close_chunk(conn, lease.chunk_id, lease.job_id, "cancelled")
    return "cancelled"


def _backoff_s(attempt: int, base_s: float) -> float:
    return float(min(base_s * (2 ** max(attempt - 1, 0)), 300.0))


@app.task(name=TASK_RUN_CHUNK, bind=True, acks_late=True, max_retries=None)
def run_chunk(self: Task, chunk_id: str) -> str:
    """Process one chunk. Flower shows ``{'job': ..., 'chunk': 'n/N'}`` as its arguments."""
    rt = runtime.current()
    cid = uuid.UUID(chunk_id)
    try:
        with worker_metrics.observe_chunk(rt.model) as seen:  # duration, chunks in flight
            outcome = seen.outcome = process_chunk(rt, cid)
    except _TRANSIENT as exc:
        reason = f"{type(exc).__name__}: {exc}".strip()[:500]
        log.warning("chunk %s: transient failure, retrying: %s", chunk_id, reason)
        attempts = _give_back(rt, cid, reason)
        if isinstance(exc, EngineDeadError):
            # This process cannot serve any more; let its supervisor start a fresh one.
            os.kill(os.getpid(), signal.SIGTERM)
        if attempts is None or attempts < rt.settings.max_attempts:
            raise self.retry(
                exc=exc, countdown=_backoff_s(attempts or 1, rt.settings.retry_backoff_s)
            ) from exc
        with rt.db.begin() as conn:  # out of attempts: its unfinished rows fail with the reason
            job_id = conn.execute(
                text("SELECT job_id FROM chunks WHERE id = :id"), {"id": cid}
            ).scalar_one()
            close_chunk(
                conn,
                cid,
                job_id,
                "failed",
                f"gave up after {attempts} attempts; last error: {reason}",
            )
        return "failed"
    log.info("chunk %s: %s", chunk_id, outcome)
    return outcome


def _give_back(rt: runtime.Runtime, cid: uuid.UUID, reason: str) -> int | None:
    """Returns the chunk to the queue; its attempts so far, or None if Postgres is away (then
    the lease simply expires and the reconciler takes over)."""
    try:
        with rt.db.begin() as conn:
            release_chunk(conn, cid, rt.name, reason)
            attempts = conn.execute(
                text("SELECT attempts FROM chunks WHERE id = :id"), {"id": cid}
            ).scalar()
            return int(attempts) if attempts is not None else None
    except Exception:
        return None


# --- worker lifecycle -------------------------------------------------------------------------

_reconciler_stop = None


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Builds the engine in the worker's main thread, before any task can arrive."""
    hostname = getattr(sender, "hostname", None)
    runtime.start(hostname=hostname)


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    import threading

    from workers.reconciler import reconcile, run_periodically

    global _reconciler_stop
    rt = runtime.current()
    try:
        reconcile(rt.db, app, rt.settings)
    except Exception:
        log.warning("reconciler at worker start failed", exc_info=True)
    _reconciler_stop = threading.Event()
    run_periodically(rt.db, app, rt.settings, _reconciler_stop)


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    if _reconciler_stop is not None:
        _reconciler_stop.set()
    runtime.stop()
