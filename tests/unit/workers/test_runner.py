"""The chunk runner's pure parts (rows from a finished sub-batch, sampling parameters, retry
backoff) and ``process_chunk`` against an in-memory ``ChunkStore`` and the real bench engine."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest

from service.errors import (
    EngineDeadError,
    LeaseLostError,
    StoreUnavailableError,
    TransientError,
)
from service.store.chunks import (
    Claim,
    ClaimOutcome,
    Doc,
    Expired,
    Lease,
    Released,
    RowResult,
    Written,
)
from service.store.states import ChunkState, JobStatus
from workers.engines.base import Batch, GenRequest, GenResult
from workers.engines.bench import BenchEngine, WhitespaceTokenizer
from workers.runner import (
    MAX_BACKOFF_S,
    Generation,
    Group,
    RetryChunk,
    backoff_s,
    generation,
    process_chunk,
    row_results,
)

MODEL = "test-org/test-model"
LABELS = ("positive", "negative", "very negative")


def doc(idx: int, text: str = "some text") -> Doc:
    return Doc(idx=idx, external_id=f"ext-{idx}", text=text, extra=None)


def group(
    docs: list[Doc], errors: dict[int, str], sent: list[tuple[int, bool, GenResult]]
) -> Group:
    """A finished sub-batch: ``sent`` is (position in docs, truncated, the engine's result)."""
    batch = Batch(len(sent))
    for k, (_, _, result) in enumerate(sent):
        batch.set(k, result)
    prepared = [(pos, truncated) for pos, truncated, _ in sent]
    return Group(docs, prepared, errors, batch, time.monotonic())


def without_latency(row: RowResult) -> RowResult:
    assert row.latency_ms is not None and row.latency_ms >= 0.0
    return dataclasses.replace(row, latency_ms=None)


# --- row_results ------------------------------------------------------------------------------


def test_rows_come_back_in_document_order_with_their_errors() -> None:
    docs = [doc(12), doc(10), doc(13, "  "), doc(11)]
    g = group(
        docs,
        {2: "empty text: nothing to process"},
        [
            (3, True, GenResult("summary eleven", "length", 40, 8)),
            (0, False, GenResult(error="prompt rejected by the engine", prompt_tokens=77)),
            (1, False, GenResult("summary ten", "stop", 20, 5)),
        ],
    )
    rows = row_results(g, attempts=2, labels=None)
    assert [r.idx for r in rows] == [10, 11, 12, 13]
    ten, eleven, twelve, thirteen = rows
    assert without_latency(ten) == RowResult(
        idx=10,
        output="summary ten",
        finish_reason="stop",
        prompt_tokens=20,
        completion_tokens=5,
        truncated=False,
        attempts=2,
    )
    assert without_latency(eleven) == RowResult(
        idx=11,
        output="summary eleven",
        finish_reason="length",
        prompt_tokens=40,
        completion_tokens=8,
        truncated=True,
        attempts=2,
    )
    # The engine's error for one prompt: an error row that keeps the prompt's size.
    assert twelve == RowResult(
        idx=12, error="prompt rejected by the engine", prompt_tokens=77, attempts=2
    )
    # Found while rendering: never reached the engine.
    assert thirteen == RowResult(idx=13, error="empty text: nothing to process", attempts=2)


def test_classify_output_must_be_one_of_the_labels() -> None:
    docs = [doc(0), doc(1), doc(2)]
    g = group(
        docs,
        {},
        [
            (0, True, GenResult(" negative\n", "stop", 30, 2, confidence=0.87)),
            (1, False, GenResult("very neg", "length", 31, 4)),
            (2, False, GenResult(error="engine said no", prompt_tokens=9)),
        ],
    )
    label, cut_off, engine_error = row_results(g, attempts=3, labels=LABELS)
    assert without_latency(label) == RowResult(
        idx=0,
        output=" negative\n",
        label="negative",
        confidence=0.87,
        finish_reason="stop",
        prompt_tokens=30,
        completion_tokens=2,
        truncated=True,
        attempts=3,
    )
    # Cut off by max_tokens before a label completed: an error naming the labels.
    assert cut_off.idx == 1 and cut_off.label is None and cut_off.output == "very neg"
    assert cut_off.error is not None
    assert "'very neg'" in cut_off.error
    assert "['positive', 'negative', 'very negative']" in cut_off.error
    assert "raise max_tokens?" in cut_off.error
    assert cut_off.prompt_tokens == 31 and cut_off.attempts == 3
    # An engine error stays the engine's error, not a missing label.
    assert engine_error == RowResult(idx=2, error="engine said no", prompt_tokens=9, attempts=3)


def test_nul_characters_in_model_output_are_dropped() -> None:
    """PostgreSQL text cannot hold NUL: an output with one would fail the whole write."""
    g = group(
        [doc(1), doc(2)],
        {},
        [
            (0, False, GenResult("sum\x00mary", "stop", 4, 2)),
            (1, False, GenResult("posi\x00tive", "stop", 4, 2)),
        ],
    )
    plain, labelled = row_results(g, 1, None), row_results(g, 1, ("positive", "negative"))
    assert [r.output for r in plain] == ["summary", "positive"]
    assert [(r.label, r.error is None) for r in labelled][1] == ("positive", True)


def test_outputs_of_other_tasks_are_not_labels() -> None:
    g = group([doc(5)], {}, [(0, False, GenResult("negative", "stop", 3, 1))])
    (row,) = row_results(g, attempts=1, labels=None)
    assert row.output == "negative" and row.label is None and row.error is None


def test_a_sub_batch_without_every_result_is_refused() -> None:
    batch = Batch(2)
    batch.set(0, GenResult("ok", "stop", 1, 1))
    g = Group([doc(0), doc(1)], [(0, False), (1, False)], {}, batch, time.monotonic())
    with pytest.raises(RuntimeError, match="without a result for request 1"):
        row_results(g, attempts=1, labels=None)


# --- generation -------------------------------------------------------------------------------

TOKENIZER = WhitespaceTokenizer()  # one token per word


@pytest.mark.parametrize("task", ["generate", "summarize"])
def test_generation_defaults(task: str) -> None:
    assert generation(task, {}, TOKENIZER, 123) == Generation(
        max_tokens=123, temperature=0.0, seed=None, choices=None
    )


def test_labels_constrain_classify_only() -> None:
    gen = generation("summarize", {"labels": ["a", "b"]}, TOKENIZER, 50)
    assert gen.choices is None and gen.max_tokens == 50


def test_classify_without_max_tokens_fits_the_longest_label() -> None:
    gen = generation("classify", {"labels": ["yes", "no", "not sure at all"]}, TOKENIZER, 512)
    assert gen.choices == ("yes", "no", "not sure at all")
    assert gen.max_tokens == 4 + 4  # "not sure at all": four tokens, and four to spare


def test_explicit_sampling_parameters_pass_through() -> None:
    params = {"labels": list(LABELS), "max_tokens": 2, "temperature": 0.7, "seed": 42}
    assert generation("classify", params, TOKENIZER, 512) == Generation(2, 0.7, 42, LABELS)
    params = {"max_tokens": 300, "temperature": 1, "seed": 0}
    gen = generation("generate", params, TOKENIZER, 64)
    assert gen == Generation(max_tokens=300, temperature=1.0, seed=0, choices=None)
    assert isinstance(gen.temperature, float)


# --- backoff_s --------------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 2, 3, 4, 5, 6])
def test_backoff_is_full_jitter_below_the_exponential_bound(attempts: int) -> None:
    bound = min(5.0 * 2 ** (attempts - 1), MAX_BACKOFF_S)
    draws = [backoff_s(attempts, 5.0) for _ in range(500)]
    assert all(0.0 <= d <= bound for d in draws)
    assert len(set(draws)) > 1  # jittered, not one fixed delay
    assert max(draws) > bound / 2  # spread over the whole range, not stuck low


@pytest.mark.parametrize("attempts", [7, 10, 30, 100])
def test_backoff_is_capped_at_five_minutes(attempts: int) -> None:
    assert MAX_BACKOFF_S == 300
    draws = [backoff_s(attempts, 5.0) for _ in range(500)]
    assert all(0.0 <= d <= 300.0 for d in draws)
    assert max(draws) > 150.0


def test_backoff_with_base_zero_is_zero() -> None:
    assert {backoff_s(a, 0.0) for a in (1, 2, 10, 100)} == {0.0}


def test_backoff_with_a_fractional_base() -> None:
    # DOCQUEUE_RETRY_BACKOFF_S is a float >= 0, so 0.5 is a valid setting (Celery's helper,
    # random.randrange underneath, raised on it).
    draws = [backoff_s(1, 0.5) for _ in range(100)]
    assert all(0.0 <= d <= 0.5 for d in draws)
    assert len(set(draws)) > 50  # real numbers, not whole seconds


# --- process_chunk ----------------------------------------------------------------------------


class MemoryStore:
    """The ``ChunkStore`` protocol over one lease and its documents, recording what the runner
    asks of it. ``failures`` makes a method raise (method name -> exception)."""

    def __init__(
        self,
        claim: Claim,
        docs: list[Doc],
        *,
        max_attempts: int = 3,
        status: JobStatus = JobStatus.RUNNING,
    ) -> None:
        self.claimed = claim
        self.docs = docs
        self.max_attempts = max_attempts
        self.status = status
        self.failures: dict[str, Exception] = {}
        self.results: dict[int, RowResult] = {}
        self.writes: list[list[RowResult]] = []
        self.released: list[str] = []
        self.closed: list[ChunkState] = []
        self.close_errors: list[str | None] = []

    def _call(self, method: str) -> None:
        if method in self.failures:
            raise self.failures[method]

    def claim(self, chunk_id: uuid.UUID, worker: str) -> Claim:
        self._call("claim")
        if self.claimed.lease is None:
            return self.claimed
        return dataclasses.replace(self.claimed, docs=tuple(self.pending(self.claimed.lease)))

    def pending(self, lease: Lease) -> list[Doc]:
        self._call("pending")
        return [d for d in self.docs if d.idx not in self.results]

    def renew(self, leases: Iterable[Lease]) -> set[uuid.UUID]:
        return set()

    def write(self, lease: Lease, results: Sequence[RowResult]) -> Written:
        self._call("write")
        self.writes.append(list(results))
        new = [r for r in results if r.idx not in self.results]
        self.results.update((r.idx, r) for r in new)
        return Written(
            self.status,
            succeeded=sum(r.error is None for r in new),
            failed=sum(r.error is not None for r in new),
            completion_tokens=sum(r.completion_tokens for r in new),
        )

    def finish(self, lease: Lease, results: Sequence[RowResult]) -> Written:
        written = self.write(lease, results)
        self.close(lease, ChunkState.DONE)
        return written

    def release(self, lease: Lease, error: str) -> Released:
        self._call("release")
        self.released.append(error)
        return Released(lease.attempts, requeued=lease.attempts < self.max_attempts)

    def close(self, lease: Lease, state: ChunkState, error: str | None = None) -> None:
        self._call("close")
        self.closed.append(state)
        self.close_errors.append(error)

    def job_status(self, job_id: uuid.UUID) -> JobStatus | None:
        return self.status

    def cancel(self, job_id: uuid.UUID) -> JobStatus:
        self.status = JobStatus.CANCELLING
        return self.status

    def expire(self) -> Expired:
        return Expired()


@dataclass
class Worker:
    """The runner's ``Context``: the store, the engine, and the leases held and dropped."""

    store: MemoryStore
    engine: BenchEngine = field(default_factory=lambda: BenchEngine(MODEL))
    model: str = MODEL
    name: str = "gpu0@test"
    sub_batch_size: int = 2
    default_max_tokens: int = 64
    summary_words: int = 60
    retry_backoff_s: float = 5.0
    held: list[Lease] = field(default_factory=list)
    dropped: list[Lease] = field(default_factory=list)

    def hold(self, lease: Lease) -> None:
        self.held.append(lease)

    def drop(self, lease: Lease) -> None:
        self.dropped.append(lease)

    def lost(self, lease: Lease) -> bool:
        return False

    def watch(self, lease: Lease, batches: Sequence[Batch]) -> None:
        return None

    def stalled(self, lease: Lease) -> bool:
        return False

    def closed(self, lease: Lease) -> None:
        return None


class DyingEngine(BenchEngine):
    """The bench engine, dead: every batch fails as the vLLM driver's do when the engine dies."""

    def submit(self, requests: list[GenRequest]) -> Batch:
        batch = Batch(len(requests))
        batch.fail(EngineDeadError("engine died"))
        return batch


def lease(
    task: str = "generate", *, model: str = MODEL, attempts: int = 1, **params: object
) -> Lease:
    return Lease(
        chunk_id=uuid.uuid4(),
        token=uuid.uuid4(),
        job_id=uuid.uuid4(),
        seq=0,
        start_idx=0,
        end_idx=5,
        attempts=attempts,
        task=task,
        model=model,
        params=dict(params),
    )


def leased(
    lz: Lease, docs: list[Doc] | None = None, status: JobStatus = JobStatus.RUNNING
) -> MemoryStore:
    """A store whose claim leases ``lz``, over five documents unless told otherwise."""
    docs = [doc(i, f"word{i} " * (i + 1)) for i in range(5)] if docs is None else docs
    return MemoryStore(Claim(lz, ClaimOutcome.LEASED, lz.job_id), docs, status=status)


class LateEngine(BenchEngine):
    """The bench engine, but the sub-batches after the first ``early`` ones finish a moment
    after their submit (on a timer thread), as a real engine's later sub-batches do."""

    def __init__(self, early: int) -> None:
        super().__init__(MODEL)
        self.early = early
        self.submitted = 0

    def submit(self, requests: list[GenRequest]) -> Batch:
        answered = super().submit(requests)
        self.submitted += 1
        if self.submitted <= self.early:
            return answered
        late = Batch(len(requests))

        def finish() -> None:
            for i, result in enumerate(answered.results):
                assert result is not None
                late.set(i, result)

        threading.Timer(0.3, finish).start()
        return late


def test_a_chunk_runs_to_done_in_sub_batches() -> None:
    """Sub-batches finished by the time the runner looks go in one write; the last write and
    the close are one call (``finish``, one transaction)."""
    lz = lease()
    docs = [doc(0, "one"), doc(1, "two words"), doc(2, " \n"), doc(3, "four " * 4), doc(4, "x")]
    worker = Worker(leased(lz, docs), engine=LateEngine(early=2))
    assert process_chunk(worker, lz.chunk_id) == "done"
    store = worker.store
    assert [[r.idx for r in w] for w in store.writes] == [[0, 1, 2, 3], [4]]
    assert store.closed == [ChunkState.DONE] and store.released == []
    assert worker.held == [lz] and worker.dropped == [lz]
    rows = [store.results[i] for i in range(5)]
    assert [r.output for r in rows] == ["ok", "ok", None, "ok", "ok"]
    assert rows[2].error is not None and "empty text" in rows[2].error
    # The bench tokenizer: one token per word of the prompt (the generate prompt is the text).
    assert [r.prompt_tokens for r in rows] == [1, 2, 0, 4, 1]


def test_classify_rows_carry_labels_and_truncation() -> None:
    lz = lease("classify", labels=list(LABELS))
    long_doc = doc(1, " ".join(f"w{i}" for i in range(200)))
    # max_tokens defaults to the longest label (2 words) + 4; 40 tokens leave a prompt of 34.
    worker = Worker(leased(lz, [doc(0, "great"), long_doc]), engine=BenchEngine(MODEL, 40))
    assert process_chunk(worker, lz.chunk_id) == "done"
    short, long = worker.store.results[0], worker.store.results[1]
    assert (short.label, short.confidence, short.truncated) == ("positive", 1.0, False)
    assert (long.label, long.truncated, long.error) == ("positive", True, None)
    assert long.prompt_tokens <= 40 - 6


@pytest.mark.parametrize(
    "outcome",
    [o for o in ClaimOutcome if o is not ClaimOutcome.LEASED],
)
def test_a_claim_without_a_lease_returns_its_outcome(outcome: ClaimOutcome) -> None:
    worker = Worker(MemoryStore(Claim(None, outcome), [doc(0)]))
    assert process_chunk(worker, uuid.uuid4()) == outcome.value
    assert worker.held == [] and worker.store.writes == [] and worker.store.closed == []


def test_a_chunk_of_another_model_is_given_back() -> None:
    lz = lease(model="another/model")
    worker = Worker(leased(lz))
    assert process_chunk(worker, lz.chunk_id) == "wrong_model"
    assert worker.store.released == [f"worker serves {MODEL}"]
    assert worker.held == [] and worker.store.writes == [] and worker.store.closed == []


@pytest.mark.parametrize("method", ["write", "close"])
def test_a_lost_lease_stops_the_runner_and_leaves_the_chunk(method: str) -> None:
    lz = lease()
    worker = Worker(leased(lz))
    worker.store.failures[method] = LeaseLostError("taken over")
    assert process_chunk(worker, lz.chunk_id) == "lease_lost"
    assert worker.store.closed == [] and worker.store.released == []
    assert worker.dropped == [lz]


def test_a_cancelled_job_closes_the_chunk_cancelled() -> None:
    """The first write finds the job cancelling while later sub-batches still run."""
    lz = lease()
    worker = Worker(leased(lz, status=JobStatus.CANCELLING), engine=LateEngine(early=1))
    assert process_chunk(worker, lz.chunk_id) == "cancelled"
    assert len(worker.store.writes) == 1  # the first sub-batch's rows are kept, no more
    assert worker.store.closed == [ChunkState.CANCELLED]


@pytest.mark.parametrize(
    ("where", "cause"),
    [
        ("engine", EngineDeadError),
        ("write", StoreUnavailableError),
    ],
)
def test_a_transient_failure_gives_the_chunk_back_and_retries(
    where: str, cause: type[TransientError]
) -> None:
    """A dead engine, or the store away while writing results."""
    lz = lease(attempts=2)
    worker = Worker(leased(lz))
    if where == "engine":
        worker.engine = DyingEngine(MODEL)
    else:
        worker.store.failures[where] = StoreUnavailableError("database unavailable")
    with pytest.raises(RetryChunk) as info:
        process_chunk(worker, lz.chunk_id)
    assert isinstance(info.value.cause, cause)
    countdown = info.value.countdown_s
    assert countdown is not None and 0.0 <= countdown <= 5.0 * 2  # 2nd attempt: base * 2
    (reason,) = worker.store.released
    assert reason.startswith(f"{cause.__name__}: ")
    assert worker.store.closed == [] and worker.dropped == [lz]


def test_a_transient_failure_on_the_last_attempt_fails_the_chunk() -> None:
    lz = lease(attempts=3)
    worker = Worker(leased(lz))
    worker.store.failures["write"] = StoreUnavailableError("database unavailable")
    assert process_chunk(worker, lz.chunk_id) == "failed"
    assert worker.store.released == ["StoreUnavailableError: database unavailable"]
    assert worker.store.closed == []  # the store closed it when releasing, not the runner


def test_a_dead_engine_on_the_last_attempt_still_reaches_the_task() -> None:
    """No retry (the chunk is closed), but the task must learn that the engine died, so the
    process restarts with a fresh one instead of failing every later chunk."""
    lz = lease(attempts=3)
    worker = Worker(leased(lz), engine=DyingEngine(MODEL))
    with pytest.raises(RetryChunk) as info:
        process_chunk(worker, lz.chunk_id)
    assert info.value.countdown_s is None and isinstance(info.value.cause, EngineDeadError)
    assert worker.store.released == ["EngineDeadError: engine died"]


def test_an_unexpected_error_fails_the_chunk_at_once_without_a_retry() -> None:
    """Not transient, not bad input: the unfinished rows fail now with the reason (no retry,
    no waiting for the lease to expire)."""
    lz = lease()
    worker = Worker(leased(lz))
    worker.store.failures["write"] = ValueError("a bug")
    assert process_chunk(worker, lz.chunk_id) == "failed"
    assert worker.store.released == []
    assert worker.store.closed == [ChunkState.FAILED]
    assert worker.store.close_errors == ["internal error: ValueError: a bug"]
    assert worker.dropped == [lz]


def test_a_release_that_fails_too_still_retries() -> None:
    """With the database away the release fails as well: retry after the lease's backoff (the
    lease expires meanwhile and the reconciler re-sends if the retry is lost)."""
    lz = lease(attempts=1)
    worker = Worker(leased(lz))
    worker.store.failures["write"] = StoreUnavailableError("database unavailable")
    worker.store.failures["release"] = StoreUnavailableError("database unavailable")
    with pytest.raises(RetryChunk) as info:
        process_chunk(worker, lz.chunk_id)
    assert isinstance(info.value.cause, StoreUnavailableError)
    countdown = info.value.countdown_s
    assert countdown is not None and 0.0 <= countdown <= 5.0


def test_a_release_refused_for_a_lost_lease_stops_the_runner() -> None:
    lz = lease()
    worker = Worker(leased(lz), engine=DyingEngine(MODEL))
    worker.store.failures["release"] = LeaseLostError("taken over")
    assert process_chunk(worker, lz.chunk_id) == "lease_lost"
    assert worker.store.closed == []
