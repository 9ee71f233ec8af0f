"""The engine interface: submit a batch of token-id prompts, collect results as they finish.

A chunk submits all its sub-batches at once, so the engine always has the next work queued
while the current sequences decode (continuous batching across chunks); the chunk then writes
each sub-batch as it completes. Engines never touch the database.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.jobs.validate import ModelCapabilities


@dataclass(slots=True)
class GenRequest:
    """One prompt and how to sample it. Beyond the native tasks' few fields, what an OpenAI
    request may ask (``n``, ``top_p``, ``stop``, penalties, a JSON response, logprobs).

    Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, 4.6 µs per
    request against 1.4, paid for every document of a fast task."""

    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    choices: tuple[str, ...] | None = None  # classify: constrain the output to one of these
    n: int = 1
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    json_schema: str | None = None  # the output must match this JSON schema (its JSON text)
    json_object: bool = False  # the output must be a JSON object
    logprobs: int | None = None  # each token's logprob and this many alternatives (0: none)

    @property
    def wants_choices(self) -> bool:
        """The result must carry each choice (several, or with their logprobs)."""
        return self.n > 1 or self.logprobs is not None


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # the likeliest tokens at this step


@dataclass(frozen=True)
class Choice:
    """One of a request's ``n`` completions."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class GenResult:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    confidence: float | None = None
    error: str | None = None  # the engine rejected this one prompt
    # Every choice, when the request ``wants_choices``; ``text`` is then the first one's and
    # ``completion_tokens`` all of theirs (as OpenAI's usage counts them).
    choices: tuple[Choice, ...] | None = None


class Batch:
    """A set of requests in flight; completes when every request has a result."""

    def __init__(self, n: int) -> None:
        self.results: list[GenResult | None] = [None] * n
        self._left = n
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.failure: BaseException | None = None  # the engine died under this batch
        self.request_ids: list[str] = []
        # When the engine last returned anything for this batch (a token or a finished
        # request), on the monotonic clock; None: nothing yet. The worker's heartbeat gives
        # back a chunk whose engine stops progressing (``workers.runtime``).
        self.progressed_at: float | None = None
        if n == 0:
            self._done.set()

    def progress(self) -> None:
        """The engine produced output (a token) for one of this batch's requests."""
        self.progressed_at = time.monotonic()

    def set(self, i: int, result: GenResult) -> None:
        with self._lock:
            self.progressed_at = time.monotonic()
            if self.results[i] is None:
                self.results[i] = result
                self._left -= 1
                if self._left == 0:
                    self._done.set()

    def fill(self, results: list[GenResult]) -> None:
        """Every result at once (an engine that answers a whole batch together): one lock and
        one clock read instead of one per request."""
        with self._lock:
            if len(results) != len(self.results) or self._left != len(self.results):
                raise ValueError("fill() needs a fresh batch and one result per request")
            self.results = list(results)
            self._left = 0
            self.progressed_at = time.monotonic()
            self._done.set()

    def fail(self, exc: BaseException) -> None:
        self.failure = exc
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class ThreadTokenizers:
    """The model's tokenizer, one per calling thread: fast tokenizers are not safe to share
    across threads, and each chunk thread renders its own prompts."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._local = threading.local()

    def get(self) -> Any:
        tok = getattr(self._local, "tok", None)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model)
            self._local.tok = tok
        return tok


class Engine(Protocol):
    model: str
    max_model_len: int
    device: str

    @property
    def capabilities(self) -> ModelCapabilities | None:
        """What the model can do, as workers register it and jobs are checked against it; None
        says nothing (a causal LM: every task, its prompt rendered through the chat template)."""

    def tokenizer(self) -> Any:
        """A tokenizer for rendering prompts; one per calling thread (fast tokenizers are not
        safe to share across threads)."""

    def submit(self, requests: list[GenRequest]) -> Batch: ...

    def cancel(self, batch: Batch) -> None:
        """Aborts the batch's unfinished requests (their results stay empty)."""

    def close(self) -> None: ...
