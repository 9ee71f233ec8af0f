"""A simulated GPU engine for benchmarks of how well docqueue feeds one. Never the default.

It stands for a GPU running continuous batching (as vLLM does) and spends wall time, not CPU: a
scheduler thread admits waiting requests up to ``max_num_seqs``, charges each step a decode
time (``step_ms`` plus ``step_ms_per_seq`` per running sequence) and the prefill of the prompts
it admitted (``prefill_tokens_per_ms``), sleeps that long, then gives every running sequence
one token. A request finishes when it reaches its output length, which is drawn from a
distribution seeded by its prompt's token ids: the same document gets the same length on every
path (in-process or through a worker), some stop after a few tokens, some run to ``max_tokens``.

The simulated GPU runs its steps back to back on its own clock: a scheduler thread that wakes
late (the worker's GIL, a busy host) delays when results are delivered, not the next step, as
vLLM's engine core, in its own process, does not wait for the worker's Python threads. A
request only joins a step that started after it arrived, and lateness beyond ``LAG_CAP_S``
counts as idle time. Figures from it are a simulation, never a GPU result.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
import zlib
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.errors import EngineDeadError
from workers.engines.base import Batch, Choice, GenRequest, GenResult, TokenLogprob
from workers.engines.bench import WhitespaceTokenizer, _Encoded

if TYPE_CHECKING:
    from service.jobs.validate import ModelCapabilities

log = logging.getLogger(__name__)

#: A scheduler thread late by more than this (a host stall) leaves the simulated GPU idle.
LAG_CAP_S = 0.5
#: Shortest output of a free-text request ("some rows stop at 5 tokens").
MIN_TOKENS = 5
#: The word every generated token decodes to.
WORD = "sim"


class StableTokenizer(WhitespaceTokenizer):
    """The bench engine's one-token-per-word tokenizer with ids stable across processes
    (``hash()`` of a string is salted per process): output lengths are drawn from token ids,
    so a document must get the same ids in the benchmark's process and in a worker."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> _Encoded:
        return _Encoded([zlib.crc32(w.encode()) & 0xFFFF for w in text.split()])


def output_tokens(prompt_token_ids: list[int], max_tokens: int, choice: int = 0) -> int:
    """How many tokens the simulated model generates for this prompt: 15% stop within 5 to 12
    tokens, 15% run to ``max_tokens``, the rest log-normal around a third of it (with
    ``max_tokens`` 128: mean about 57). A pure function of the ids, so every path agrees."""
    digest = hashlib.blake2b(array("q", prompt_token_ids).tobytes(), digest_size=8)
    rng = random.Random(int.from_bytes(digest.digest(), "big") + choice)
    ceiling = max(1, max_tokens)
    draw = rng.random()
    if draw < 0.15:
        n = rng.randint(MIN_TOKENS, MIN_TOKENS + 7)
    elif draw < 0.30:
        n = ceiling
    else:
        n = int(rng.lognormvariate(math.log(max(ceiling / 3, 1.0)), 0.6))
    return max(1, min(ceiling, max(MIN_TOKENS, n)))


@dataclass(frozen=True)
class SimParams:
    """The simulated GPU's timing (``DOCQUEUE_SIM_*``)."""

    step_ms: float = 15.0
    step_ms_per_seq: float = 0.02
    max_num_seqs: int = 256
    prefill_tokens_per_ms: float = 50.0


@dataclass
class BusyPeriod:
    """The simulated GPU from its first step after idle to its last before idle again: where a
    benchmark sees bubbles (``starved_steps``: free slots, nothing waiting)."""

    started: float  # the first step's start, time.monotonic() (one clock for all processes)
    ended: float = 0.0  # the last step's end
    steps: int = 0
    tokens: int = 0  # tokens generated: the slots used, summed over steps
    starved_steps: int = 0


@dataclass(eq=False)
class _Seq:
    """One request in the simulated engine: ``n`` sequences that run in lockstep."""

    batch: Batch
    index: int
    request: GenRequest
    arrived: float
    lengths: tuple[int, ...] = ()  # per choice; drawn at admission, off the caller's thread
    generated: int = 0
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        self.slots = self.request.n

    @property
    def target(self) -> int:
        return max(self.lengths)


class SimEngine:
    """Continuous batching on a simulated clock (see the module docstring)."""

    capabilities: ModelCapabilities | None = None  # a causal LM: every task

    def __init__(
        self, model: str, params: SimParams | None = None, max_model_len: int = 32_768
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.device = "sim"
        self.params = params or SimParams()
        self._tok = StableTokenizer()
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._closed = False
        self._wake = threading.Event()  # set by close: cut a step's sleep short
        #: Simulated steps run, the most sequences running at once, and the last busy periods
        #: (for tests and benchmarks; each period is also logged at INFO when it ends).
        self.steps = 0
        self.peak_running = 0
        self.periods: deque[BusyPeriod] = deque(maxlen=1000)
        self._thread = threading.Thread(target=self._loop, name="docqueue-sim-engine", daemon=True)
        self._thread.start()

    def tokenizer(self) -> Any:
        return self._tok

    @property
    def in_flight(self) -> tuple[int, int]:
        """Requests (waiting, running) now."""
        with self._cv:
            return len(self._waiting), len(self._running)

    # ----------------------------------------------------------------------------- requests

    def submit(self, requests: list[GenRequest]) -> Batch:
        batch = Batch(len(requests))
        now = time.monotonic()
        accepted: list[_Seq] = []
        for i, req in enumerate(requests):
            problem = self._refuse(req)
            if problem is not None:
                batch.set(i, GenResult(prompt_tokens=len(req.prompt_token_ids), error=problem))
                continue
            accepted.append(_Seq(batch, i, req, now))
        with self._cv:
            if self._closed:
                batch.fail(EngineDeadError("the simulated engine was closed"))
                return batch
            self._waiting.extend(accepted)
            self._cv.notify()
        return batch

    def _refuse(self, req: GenRequest) -> str | None:
        if not req.prompt_token_ids:
            return "empty prompt"
        if len(req.prompt_token_ids) + req.max_tokens > self.max_model_len:
            return f"prompt and max_tokens exceed max_model_len {self.max_model_len}"
        if req.n > self.params.max_num_seqs:
            return f"n={req.n} exceeds max_num_seqs {self.params.max_num_seqs}"
        return None

    @staticmethod
    def _length(req: GenRequest, choice: int) -> int:
        if req.choices:  # classify: one label's words
            return max(1, min(req.max_tokens, len(req.choices[0].split())))
        if req.json_schema or req.json_object:
            return 1
        return output_tokens(req.prompt_token_ids, req.max_tokens, choice)

    def cancel(self, batch: Batch) -> None:
        with self._cv:
            self._waiting = deque(s for s in self._waiting if s.batch is not batch)
            self._running = [s for s in self._running if s.batch is not batch]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            left = {id(s.batch): s.batch for s in (*self._waiting, *self._running)}
            self._waiting.clear()
            self._running.clear()
            self._cv.notify()
        self._wake.set()
        self._thread.join(timeout=5)
        for batch in left.values():
            batch.fail(EngineDeadError("the simulated engine was closed"))

    # ---------------------------------------------------------------------------- scheduler

    def _loop(self) -> None:
        clock: float | None = None  # when the last step ended on the simulated GPU; None: idle
        period: BusyPeriod | None = None
        p = self.params
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._running:
                    if period is not None:
                        self._idle(period)
                        period = None
                    clock = None
                    self._cv.wait()
                if self._closed:
                    return
                now = time.monotonic()
                start = clock if clock is not None and now - clock <= LAG_CAP_S else now
                if not self._running:  # idle until the first waiting request arrived
                    start = max(start, self._waiting[0].arrived)
                prefill = self._admit(start)
                busy = sum(s.slots for s in self._running)
                self.steps += 1
                self.peak_running = max(self.peak_running, busy)
                if period is None or start > period.ended:  # the GPU sat idle before this step
                    if period is not None:
                        self._idle(period)
                    period = BusyPeriod(started=start)
                period.steps += 1
                period.tokens += busy
                if busy < p.max_num_seqs and not (
                    self._waiting and self._waiting[0].arrived <= start
                ):
                    period.starved_steps += 1
            step_ms = p.step_ms + p.step_ms_per_seq * busy + prefill / p.prefill_tokens_per_ms
            end = start + step_ms / 1000.0
            period.ended = end
            self._wake.wait(max(0.0, end - time.monotonic()))
            finished, progressed = self._advance()
            for seq in finished:
                seq.batch.set(seq.index, _result(seq))
            for batch in progressed:
                batch.progress()
            clock = end

    def _idle(self, period: BusyPeriod) -> None:
        self.periods.append(period)
        log.info(
            "sim busy period %.6f %.6f steps %d tokens %d starved %d",
            period.started,
            period.ended,
            period.steps,
            period.tokens,
            period.starved_steps,
        )

    def _admit(self, start: float) -> int:
        """Moves waiting requests that arrived by ``start`` into the running set while slots
        are free (first come, first served); returns the prompt tokens to prefill."""
        free = self.params.max_num_seqs - sum(s.slots for s in self._running)
        tokens = 0
        while self._waiting and self._waiting[0].arrived <= start:
            seq = self._waiting[0]
            if seq.slots > free:
                break
            self._waiting.popleft()
            seq.lengths = tuple(self._length(seq.request, c) for c in range(seq.request.n))
            self._running.append(seq)
            free -= seq.slots
            tokens += len(seq.request.prompt_token_ids) * seq.slots
        return tokens

    def _advance(self) -> tuple[list[_Seq], list[Batch]]:
        """One token for every running sequence (those cancelled during the step are gone)."""
        with self._cv:
            finished: list[_Seq] = []
            still: list[_Seq] = []
            progressed: dict[int, Batch] = {}
            for seq in self._running:
                seq.generated += 1
                if seq.generated >= seq.target:
                    finished.append(seq)
                else:
                    still.append(seq)
                    progressed[id(seq.batch)] = seq.batch
            self._running = still
        return finished, list(progressed.values())


def _result(seq: _Seq) -> GenResult:
    req = seq.request
    texts = [_text(req, n) for n in seq.lengths]
    reasons = ["length" if n >= req.max_tokens and not req.choices else "stop" for n in seq.lengths]
    choices = None
    if req.wants_choices:
        choices = tuple(
            Choice(
                text,
                reason,
                n,
                None if req.logprobs is None else tuple(TokenLogprob(w, 0.0) for w in text.split()),
            )
            for text, reason, n in zip(texts, reasons, seq.lengths, strict=True)
        )
    return GenResult(
        text=texts[0],
        finish_reason=reasons[0],
        prompt_tokens=len(req.prompt_token_ids),
        completion_tokens=sum(seq.lengths),
        confidence=1.0 if req.choices else None,
        choices=choices,
    )


def _text(req: GenRequest, tokens: int) -> str:
    if req.choices:
        return req.choices[0]
    if req.json_schema or req.json_object:
        return "{}"
    return " ".join([WORD] * tokens)
