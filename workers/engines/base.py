"""The engine interface: submit a batch of token-id prompts, collect results as they finish.

A chunk submits all its sub-batches at once, so the engine always has the next work queued
while the current sequences decode (continuous batching across chunks); the chunk then writes
each sub-batch as it completes. Engines never touch the database.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class GenRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    choices: tuple[str, ...] | None = None  # classify: constrain the output to one of these


@dataclass
class GenResult:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    confidence: float | None = None
    error: str | None = None  # the engine rejected this one prompt


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

    def fail(self, exc: BaseException) -> None:
        self.failure = exc
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class Engine(Protocol):
    model: str
    max_model_len: int
    device: str

    def tokenizer(self) -> Any:
        """A tokenizer for rendering prompts; one per calling thread (fast tokenizers are not
        safe to share across threads)."""

    def submit(self, requests: list[GenRequest]) -> Batch: ...

    def cancel(self, batch: Batch) -> None:
        """Aborts the batch's unfinished requests (their results stay empty)."""

    def close(self) -> None: ...
