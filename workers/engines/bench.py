"""A zero-cost engine for benchmarks of docqueue's own overhead. Never the default.

It answers every prompt at once with a fixed short output, so a benchmark measures ingest,
queueing, leasing, result writes and finalization, not the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.engines.base import Batch, Choice, GenRequest, GenResult, TokenLogprob

if TYPE_CHECKING:
    from service.jobs.validate import ModelCapabilities


class _Encoded:
    def __init__(self, ids: list[int]) -> None:
        self.input_ids = ids


#: A document with this word makes the bench engine hang on its batch (see ``BenchEngine``).
HANG_WORD = "docqueue-bench-engine-hangs-here"
#: Its token id, outside the 16-bit range of every other word's: no other word can collide.
HANG_TOKEN = 0x10000


class WhitespaceTokenizer:
    """Just enough of a tokenizer for prompt rendering: one token per word, no chat template."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> _Encoded:
        return _Encoded([HANG_TOKEN if w == HANG_WORD else hash(w) & 0xFFFF for w in text.split()])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join("w" for _ in ids)


class BenchEngine:
    """Answers every prompt at once; with ``hang``, or for a batch with a prompt that contains
    ``HANG_WORD``, never answers at all.

    The hang stands for an engine that is alive but makes no progress (a wedged GPU, a
    deadlocked scheduler): vLLM itself cannot be made to hang on demand, so the heartbeat's
    progress deadline (``workers.runtime``) is tested with this one, in-process (``hang``) and
    in a real worker process (a document with ``HANG_WORD``)."""

    capabilities: ModelCapabilities | None = None  # a causal LM: every task

    def __init__(self, model: str, max_model_len: int = 1_000_000, hang: bool = False) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.device = "bench"
        self.hang = hang
        self._tok = WhitespaceTokenizer()

    def tokenizer(self) -> Any:
        return self._tok

    def submit(self, requests: list[GenRequest]) -> Batch:
        batch = Batch(len(requests))
        if self.hang or any(HANG_TOKEN in r.prompt_token_ids for r in requests):
            return batch  # accepted, never answered
        if requests:
            batch.fill([_answer(req) for req in requests])
        return batch

    def cancel(self, batch: Batch) -> None:
        return None

    def close(self) -> None:
        return None


def _answer(req: GenRequest) -> GenResult:
    label = req.choices[0] if req.choices else None
    text = label or ("{}" if req.json_schema or req.json_object else "ok")
    choices = None
    if req.wants_choices:
        logprobs = None if req.logprobs is None else (TokenLogprob(text, 0.0),)
        choices = tuple(Choice(text, "stop", 1, logprobs) for _ in range(req.n))
    return GenResult(
        text=text,
        finish_reason="stop",
        prompt_tokens=len(req.prompt_token_ids),
        completion_tokens=req.n,
        confidence=1.0 if label else None,
        choices=choices,
    )
