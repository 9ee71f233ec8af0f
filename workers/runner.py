"""The chunk runner: lease a chunk, run its documents through the engine, write results.

Per-document problems become that row's error; transient problems (database away, engine dead)
raise ``TransientError`` to the task, which gives the chunk back and retries it with backoff up
to ``max_attempts`` (the chunk state machine counts them). A redelivered or duplicated message
is harmless: the lease admits one runner, results are unique per document, and a runner whose
lease was taken over has its late writes refused (``LeaseLostError``) and stops.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.batches.requests import finite_logprob
from service.errors import EngineDeadError, LeaseLostError, RowError, TransientError
from service.store.chunks import ChunkStore, Doc, Lease, RowResult
from service.store.states import CANCEL_STATUSES, ChunkState, Task
from workers import metrics as worker_metrics
from workers.engines import Batch, Engine, GenRequest
from workers.engines.base import Choice
from workers.prompts import encode_document, openai_request, render

log = logging.getLogger(__name__)
#: How often a running chunk checks whether its job was cancelled or its lease lost.
POLL_S = 2.0
#: Longest backoff between two attempts of a chunk.
MAX_BACKOFF_S = 300


class RetryChunk(TransientError):
    """The chunk was given back after a transient failure: retry it after ``countdown_s``
    (None: it was closed instead, on its last attempt; only the cause still matters)."""

    def __init__(self, cause: TransientError, countdown_s: float | None) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}".strip()[:500])
        self.cause = cause
        self.countdown_s = countdown_s


class EngineStalledError(EngineDeadError):
    """The engine is alive but returned nothing for the chunk within ``progress_deadline_s``
    (the heartbeat's verdict). Handled as a dead engine: the chunk is given back, its attempt
    counted (a chunk that hangs every engine ends ``failed`` after ``max_attempts`` instead of
    looping), and the process restarts with a fresh engine."""


@dataclass(frozen=True)
class Generation:
    """The sampling parameters every request of a chunk shares."""

    max_tokens: int
    temperature: float
    seed: int | None
    choices: tuple[str, ...] | None  # classify: the output is one of these


@dataclass
class Group:
    """One engine sub-batch of a chunk: which documents went in, which failed before it."""

    docs: list[Doc]
    prepared: list[tuple[int, bool]]  # (position in docs, truncated) of rows sent to the engine
    errors: dict[int, str]  # position in docs -> row error found while rendering
    batch: Batch
    submitted_at: float


class Context(Protocol):
    """What a runner needs from its worker process: the store, the warm engine, its name and
    settings, and which of its leases the heartbeat found lost (``workers.runtime.Runtime``)."""

    @property
    def store(self) -> ChunkStore: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def model(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def sub_batch_size(self) -> int: ...
    @property
    def default_max_tokens(self) -> int: ...
    @property
    def summary_words(self) -> int: ...
    @property
    def retry_backoff_s(self) -> float: ...

    def hold(self, lease: Lease) -> None:
        """The heartbeat renews this lease until ``drop``."""

    def drop(self, lease: Lease) -> None: ...

    def lost(self, lease: Lease) -> bool:
        """The heartbeat found this lease taken over."""

    def watch(self, lease: Lease, batches: Sequence[Batch]) -> None:
        """The engine batches the lease's chunk now waits on (for the progress deadline)."""

    def stalled(self, lease: Lease) -> bool:
        """The heartbeat gave up on this lease: its engine made no progress in time."""

    def closed(self, lease: Lease) -> None:
        """The runner closed the lease's chunk (done or cancelled): if that ended its job, the
        context may act on it (an OpenAI batch's files are written at once)."""


def generation(task: str, params: dict[str, Any], tokenizer: Any, default: int) -> Generation:
    """Sampling parameters from the job's params. A classify job without ``max_tokens`` gets
    the longest label's token count plus a little room, so a label is never cut off."""
    labels = tuple(params.get("labels") or ()) if task == Task.CLASSIFY else None
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        if labels:
            longest = max(len(tokenizer(lab, add_special_tokens=False).input_ids) for lab in labels)
            max_tokens = longest + 4
        else:
            max_tokens = default
    return Generation(
        max_tokens=int(max_tokens),
        temperature=float(params.get("temperature", 0.0)),
        seed=params.get("seed"),
        choices=labels,
    )


def backoff_s(attempts: int, base_s: float) -> float:
    """Seconds before the next attempt: exponential in the attempts made so far, with full
    jitter (so chunks that failed together do not retry together), capped at 5 minutes.

    Celery's ``get_exponential_backoff_interval(..., full_jitter=True)`` draws with
    ``random.randrange``, which takes whole seconds only: a fractional ``retry_backoff_s``
    raised there. This is the same formula over real numbers."""
    ceiling = min(float(MAX_BACKOFF_S), max(base_s, 0.0) * 2.0 ** max(attempts - 1, 0))
    return random.uniform(0.0, ceiling)


def process_chunk(ctx: Context, chunk_id: uuid.UUID) -> str:
    """Runs one chunk; returns what happened ("done", "cancelled", "busy", "lease_lost" ...)."""
    claim = ctx.store.claim(chunk_id, ctx.name)
    if claim.lease is None:
        return str(claim.outcome)
    lease = claim.lease
    if lease.model != ctx.model:  # a message on the wrong queue: give it back
        ctx.store.release(lease, f"worker serves {ctx.model}")
        return "wrong_model"
    ctx.hold(lease)
    try:
        return run_lease(ctx, lease, list(claim.docs))
    except LeaseLostError as exc:
        log.warning("chunk %s: %s; stopping, the new owner's results stand", chunk_id, exc)
        return "lease_lost"
    except TransientError as exc:
        return give_back(ctx, lease, exc)
    except Exception as exc:
        # Not transient, not the input's fault: a bug, or a store error that is not about
        # connectivity. No retry (the error tree's rule); the chunk's unfinished rows fail now
        # with the reason, rather than waiting for the lease to expire.
        log.exception("chunk %s: unexpected error; its unfinished rows fail", chunk_id)
        reason = f"internal error: {type(exc).__name__}: {exc}".strip()[:500]
        # Someone else's now, or the database is away: the lease expires, the reconciler acts.
        with contextlib.suppress(LeaseLostError, TransientError):
            ctx.store.close(lease, ChunkState.FAILED, reason)
        return "failed"
    finally:
        ctx.drop(lease)


def give_back(ctx: Context, lease: Lease, exc: TransientError) -> str:
    """After a transient failure: the chunk goes back to the queue and ``RetryChunk`` says
    when to retry, or, on its last attempt, it is closed ``failed`` with the reason. With the
    database away the release fails too; the lease then expires and the reconciler re-sends."""
    reason = f"{type(exc).__name__}: {exc}".strip()[:500]
    log.warning(
        "chunk %s: transient failure (attempt %d): %s", lease.chunk_id, lease.attempts, reason
    )
    try:
        released = ctx.store.release(lease, reason)
    except LeaseLostError:
        return "lease_lost"
    except TransientError:
        raise RetryChunk(exc, backoff_s(lease.attempts, ctx.retry_backoff_s)) from exc
    if not released.requeued:
        if isinstance(exc, EngineDeadError):
            raise RetryChunk(exc, None) from exc  # no retry, but the process must restart
        return "failed"
    raise RetryChunk(exc, backoff_s(released.attempts, ctx.retry_backoff_s)) from exc


def run_lease(ctx: Context, lease: Lease, docs: list[Doc]) -> str:
    """Renders and submits every sub-batch up front (the engine then always has this chunk's
    next prompts queued while earlier ones decode), then writes each as it completes."""
    engine = ctx.engine
    tokenizer = engine.tokenizer()
    gen = generation(lease.task, lease.params, tokenizer, ctx.default_max_tokens)
    params = {"summary_words": ctx.summary_words, **lease.params}

    groups = [
        _submit(engine, tokenizer, lease, docs[start : start + ctx.sub_batch_size], params, gen)
        for start in range(0, len(docs), ctx.sub_batch_size)
    ]
    ctx.watch(lease, [g.batch for g in groups])
    try:
        n = 0
        while n < len(groups):
            if not _wait(ctx, lease, groups[n]):
                return _cancel_rest(ctx, lease, groups[n:])
            failure = groups[n].batch.failure
            if failure is not None:
                raise failure
            # Every sub-batch finished by now goes in one write: a fast engine (a classifier,
            # one-token labels) then costs a transaction per chunk, not per sub-batch.
            m = n + 1
            while m < len(groups) and groups[m].batch.done and groups[m].batch.failure is None:
                m += 1
            rows = [r for g in groups[n:m] for r in row_results(g, lease.attempts, gen.choices)]
            if m == len(groups):  # the last results and the close: one transaction
                break
            written = ctx.store.write(lease, rows)
            worker_metrics.count_written(ctx.model, lease.task, written)
            if written.status in CANCEL_STATUSES:
                return _cancel_rest(ctx, lease, groups[m:])
            n = m
        else:
            rows = []  # a chunk whose rows all had results already (a re-run)
    except BaseException:
        for g in groups:
            if not g.batch.done:
                engine.cancel(g.batch)
        raise
    written = ctx.store.finish(lease, rows)
    worker_metrics.count_written(ctx.model, lease.task, written)
    ctx.closed(lease)
    return "done"


def _submit(
    engine: Engine,
    tokenizer: Any,
    lease: Lease,
    part: list[Doc],
    params: dict[str, Any],
    gen: Generation,
) -> Group:
    budget = engine.max_model_len - gen.max_tokens
    prepared: list[tuple[int, bool]] = []
    requests: list[GenRequest] = []
    errors: dict[int, str] = {}
    own_requests = lease.task in (Task.CHAT, Task.COMPLETION)  # an OpenAI batch's rows
    caps = engine.capabilities
    unprompted = caps is not None and not caps.prompted  # an encoder classifier
    for pos, doc in enumerate(part):
        try:
            if unprompted:
                if lease.task != Task.CLASSIFY:
                    raise RowError(f"{engine.model} is a classifier: it serves classify only")
                r = encode_document(tokenizer, doc, engine.max_model_len)
            elif own_requests:
                requests.append(
                    openai_request(
                        tokenizer,
                        lease.task,
                        doc,
                        engine.max_model_len,
                        int(params.get("default_max_tokens", gen.max_tokens)),
                    )
                )
                prepared.append((pos, False))
                continue
            else:
                r = render(tokenizer, lease.task, params, doc, budget)
        except RowError as exc:
            errors[pos] = str(exc)
            continue
        prepared.append((pos, r.truncated))
        requests.append(
            GenRequest(
                prompt_token_ids=r.token_ids,
                max_tokens=gen.max_tokens,
                temperature=gen.temperature,
                seed=gen.seed,
                choices=gen.choices,
            )
        )
    return Group(part, prepared, errors, engine.submit(requests), time.monotonic())


def _wait(ctx: Context, lease: Lease, group: Group) -> bool:
    """Waits for a sub-batch; False if the job was cancelled meanwhile. A lease the heartbeat
    found lost raises at once, so a paused worker stops instead of finishing for nothing; one
    it found stalled (no engine progress in time) raises ``EngineStalledError``."""
    last_poll = time.monotonic()
    while not group.batch.wait(0.5):
        if ctx.stalled(lease):
            raise EngineStalledError(
                f"chunk {lease.chunk_id}: the engine made no progress within the progress "
                "deadline (alive but hung); restarting it"
            )
        if time.monotonic() - last_poll >= POLL_S:
            last_poll = time.monotonic()
            if ctx.lost(lease):
                raise LeaseLostError(f"chunk {lease.chunk_id}: the heartbeat lost its lease")
            if ctx.store.job_status(lease.job_id) in CANCEL_STATUSES:
                return False
    return True


def row_results(group: Group, attempts: int, labels: tuple[str, ...] | None) -> list[RowResult]:
    """The rows one finished sub-batch writes, in input order: rendering errors, engine errors,
    a classify output that is not one of the labels, or the result."""
    elapsed_ms = (time.monotonic() - group.submitted_at) * 1000.0
    out: list[RowResult] = []
    for pos, message in group.errors.items():
        out.append(RowResult(idx=group.docs[pos].idx, error=message, attempts=attempts))
    for k, (pos, truncated) in enumerate(group.prepared):
        res = group.batch.results[k]
        if res is None:
            raise RuntimeError(f"sub-batch finished without a result for request {k}")
        idx = group.docs[pos].idx
        if res.error:
            out.append(
                RowResult(
                    idx=idx, error=res.error, prompt_tokens=res.prompt_tokens, attempts=attempts
                )
            )
            continue
        text = res.text.replace("\x00", "")  # PostgreSQL text cannot hold NUL
        label = text.strip() if labels else None
        if labels and label not in labels:  # cut off by max_tokens before a label completed
            out.append(
                RowResult(
                    idx=idx,
                    output=text,
                    error=f"no label: output {text!r} "
                    f"is not one of {list(labels)} (raise max_tokens?)",
                    prompt_tokens=res.prompt_tokens,
                    completion_tokens=res.completion_tokens,
                    truncated=truncated,
                    attempts=attempts,
                )
            )
            continue
        out.append(
            RowResult(
                idx=idx,
                output=text,
                label=label,
                confidence=res.confidence,
                finish_reason=res.finish_reason,
                prompt_tokens=res.prompt_tokens,
                completion_tokens=res.completion_tokens,
                truncated=truncated,
                attempts=attempts,
                latency_ms=elapsed_ms,
                choices=None
                if res.choices is None
                else [_choice(i, c) for i, c in enumerate(res.choices)],
            )
        )
    out.sort(key=lambda r: r.idx)
    return out


def _choice(index: int, choice: Choice) -> dict[str, Any]:
    """One choice as the result row keeps it (``results.choices``)."""
    logprobs = None
    if choice.logprobs is not None:
        logprobs = [
            {
                "token": t.token,
                "logprob": finite_logprob(t.logprob),
                "top_logprobs": [
                    {"token": tok, "logprob": finite_logprob(lp)} for tok, lp in t.top
                ],
            }
            for t in choice.logprobs
        ]
    return {
        "index": index,
        "text": choice.text,
        "finish_reason": choice.finish_reason,
        "completion_tokens": choice.completion_tokens,
        "logprobs": logprobs,
    }


def _cancel_rest(ctx: Context, lease: Lease, groups: list[Group]) -> str:
    for g in groups:
        ctx.engine.cancel(g.batch)
    ctx.store.close(lease, ChunkState.CANCELLED)
    ctx.closed(lease)
    return "cancelled"
