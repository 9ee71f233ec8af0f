"""The transformers engine: Hugging Face models where vLLM does not serve them (an older GPU, a
CPU-only host, an encoder classifier), batched the way a hand-written loop is not.

A driver thread keeps one pool of the requests of every batch submitted (every chunk's
sub-batches), so the model stays fed across chunks as with vLLM. Each step takes the oldest
request and the requests nearest it in prompt length from a window of the pool, left-padded
into one batch sized by a token budget (prompt and new tokens, padding included), not by a
fixed count:

- **generate** (causal LMs): one ``model.generate`` call. Each row keeps its own
  ``max_tokens``, temperature, ``top_p`` and seed (``_RowSampler``); the call itself is greedy,
  so greedy rows are exactly what a plain ``model.generate`` gives on the same padded batch.
- **classify on a causal LM**: each label's continuation (its tokens and EOS) is scored after
  the prompt in one forward pass; the most likely label wins and its confidence is its
  probability among the labels (exact, not sampled).
- **a ``*ForSequenceClassification`` model**: classify directly, the document without a
  prompt; labels from ``id2label``, confidence the softmax.

It imports neither vLLM, Celery nor psycopg: ``docqueue run --engine transformers`` runs where
only torch and transformers are installed.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from service.errors import EngineDeadError
from service.jobs.validate import ModelCapabilities
from workers.engines.base import Batch, Choice, GenRequest, GenResult, ThreadTokenizers

log = logging.getLogger(__name__)

#: Requests beyond the oldest that a step may pick from, in multiples of the batch's row cap:
#: wide enough to group prompts of like length, narrow enough that no request waits long.
WINDOW_BATCHES = 4


@dataclass(eq=False)
class _Item:
    batch: Batch
    index: int  # the request's place in its batch
    req: GenRequest
    copies: list[GenResult] = field(default_factory=list)  # n > 1: the choices so far

    @property
    def length(self) -> int:
        return len(self.req.prompt_token_ids)

    @property
    def scores(self) -> bool:
        return self.req.choices is not None


def plan(
    lengths: list[int],
    new_tokens: list[int],
    budget_tokens: int,
    max_rows: int,
    max_len: int | None = None,
) -> list[list[int]]:
    """Batches of request positions, sorted by prompt length and packed while rows * (longest
    prompt + most new tokens) stays within ``budget_tokens``, rows within ``max_rows`` and the
    longest prompt + most new tokens within ``max_len`` (every row of a ``generate`` call runs
    as long as the longest; a short-prompt row's many new tokens must not push a long prompt's
    row past the model's context). A request over the budget on its own still gets a batch of
    one."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = most = 0
    for i in order:
        grown_longest, grown_most = max(longest, lengths[i]), max(most, new_tokens[i])
        if current and (
            (len(current) + 1) * (grown_longest + grown_most) > budget_tokens
            or len(current) >= max_rows
            or (max_len is not None and grown_longest + grown_most > max_len)
        ):
            batches.append(current)
            current, grown_longest, grown_most = [], lengths[i], new_tokens[i]
        current.append(i)
        longest, most = grown_longest, grown_most
    if current:
        batches.append(current)
    return batches


def pad_rows(
    rows: list[list[int]], pad: int, device: str = "cpu", *, left: bool = True
) -> tuple[Any, Any]:
    """Token ids and attention mask of rows padded to the longest: on the left, as a decoder
    generates from them (every row's next token at the same position), or on the right, as
    encoders are trained."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            at = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, at] = torch.tensor(r, dtype=torch.long)
            mask[i, at] = 1
    return ids.to(device), mask.to(device)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, dtype: str) -> Any:
    """``auto``: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on CPU."""
    import torch

    named = {
        "half": torch.float16,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float": torch.float32,
        "float32": torch.float32,
    }
    if dtype != "auto":
        return named[dtype]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_classifier(config: Any) -> bool:
    """A ``*ForSequenceClassification`` architecture (a fine-tuned BERT, say)."""
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def capabilities_of(config: Any) -> ModelCapabilities:
    """A sequence classifier classifies only, with its own labels, the document unprompted;
    anything else is served as a causal LM."""
    if is_classifier(config):
        id2label = getattr(config, "id2label", None) or {}
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        return ModelCapabilities(tasks=("classify",), labels=labels, prompted=False)
    return ModelCapabilities()


class TransformersEngine:
    """One model on one device (the GPU the worker is pinned to, else the CPU), kept warm."""

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int | None = None,
        dtype: str = "auto",
        batch_tokens: int = 16_384,
        max_batch_rows: int = 128,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        started = time.monotonic()
        self.model = model
        self.device = device or pick_device()
        config = AutoConfig.from_pretrained(model)
        self.capabilities = capabilities_of(config)
        self._dtype = pick_dtype(self.device, dtype)
        if self.capabilities.prompted:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(model, dtype=self._dtype)
        else:
            from transformers import AutoModelForSequenceClassification

            self._model = AutoModelForSequenceClassification.from_pretrained(
                model, dtype=self._dtype
            )
        self._model.to(self.device).eval()  # type: ignore[arg-type]
        self._tok = AutoTokenizer.from_pretrained(model)
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        eos = self._tok.eos_token_id
        gen_eos = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
        eos_ids = gen_eos if gen_eos is not None else eos
        self._eos: list[int] = (
            [] if eos_ids is None else list(eos_ids) if isinstance(eos_ids, list) else [eos_ids]
        )
        pad = self._tok.pad_token_id
        self._pad: int = int(pad if pad is not None else (self._eos[0] if self._eos else 0))
        self.batch_tokens = batch_tokens
        self.max_batch_rows = max_batch_rows
        self._torch = torch
        self._label_ids: dict[str, list[int]] = {}
        self._tokenizers = ThreadTokenizers(model)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._pool: deque[_Item] = deque()
        self._cancelled: set[int] = set()  # id() of batches cancelled while running
        self._dead: BaseException | None = None
        self.steps = 0  # model calls made (generate or forward passes)
        self.start_s = time.monotonic() - started
        self._thread = threading.Thread(target=self._drive, name="transformers-driver", daemon=True)
        self._thread.start()
        log.info(
            "transformers engine for %s ready in %.1f s on %s (%s)",
            model,
            self.start_s,
            self.device,
            str(self._dtype).removeprefix("torch."),
        )

    # --- used by chunk tasks (any thread) -------------------------------------------------

    def tokenizer(self) -> Any:
        return self._tokenizers.get()

    def submit(self, requests: list[GenRequest]) -> Batch:
        batch = Batch(len(requests))
        if self._dead is not None:
            batch.fail(EngineDeadError(f"engine is dead: {self._dead}"))
            return batch
        if requests:
            self._inbox.put(("submit", (batch, requests)))
        return batch

    def cancel(self, batch: Batch) -> None:
        if not batch.done:
            self._cancelled.add(id(batch))  # seen by a generate call under way (``_Progress``)
            self._inbox.put(("abort", batch))

    def close(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    # --- the driver thread ----------------------------------------------------------------

    def _take(self, block: bool) -> bool:
        """Moves what chunk threads sent into the pool; False once the engine is closing."""
        while True:
            try:
                cmd, arg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd == "stop":
                return False
            if cmd == "submit":
                batch, requests = arg
                for i, req in enumerate(requests):
                    refused = self._refuse(req)
                    if refused is not None:
                        batch.set(
                            i, GenResult(error=refused, prompt_tokens=len(req.prompt_token_ids))
                        )
                    else:
                        self._pool.append(_Item(batch, i, req))
            elif cmd == "abort":
                self._cancelled.discard(id(arg))  # no step under way holds it any more
                self._pool = deque(it for it in self._pool if it.batch is not arg)

    def _refuse(self, req: GenRequest) -> str | None:
        """What this engine cannot do for one request: that row's error, named."""
        asked = [
            name
            for name, on in (
                ("stop", bool(req.stop)),
                ("logprobs", req.logprobs is not None),
                ("response_format", req.json_schema is not None or req.json_object),
                ("presence_penalty", bool(req.presence_penalty)),
                ("frequency_penalty", bool(req.frequency_penalty)),
            )
            if on
        ]
        if asked:
            return f"not supported by the transformers engine: {', '.join(asked)}"
        scored = req.choices is not None or not self.capabilities.prompted
        if len(req.prompt_token_ids) + (0 if scored else req.max_tokens) > self.max_model_len:
            return (
                f"the prompt ({len(req.prompt_token_ids)} tokens) and max_tokens exceed the "
                f"model's context of {self.max_model_len} tokens"
            )
        return None

    def _drive(self) -> None:
        items: list[_Item] = []
        try:
            while self._take(block=not self._pool):
                if not self._pool:
                    continue
                items = self._next()
                self.steps += 1
                self._run(items)
                items = []
        except BaseException as exc:  # the engine broke: fail what is in flight, loudly
            log.exception("transformers engine driver stopped")
            self._dead = exc
            dead = EngineDeadError(f"transformers engine failed: {exc}")
            for it in [*items, *self._pool]:  # the step under way, then the waiting
                it.batch.fail(dead)
            self._pool.clear()
            while True:
                try:
                    cmd, arg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if cmd == "submit":
                    arg[0].fail(dead)

    def _next(self) -> list[_Item]:
        """The oldest request and its neighbours in length, of its kind, from the window."""
        head = self._pool[0]
        window = [
            it
            for it in itertools.islice(self._pool, self.max_batch_rows * WINDOW_BATCHES)
            if it.scores == head.scores
        ]
        lengths = [it.length for it in window]
        if head.scores:
            new = [max(len(self._label(c)) for c in it.req.choices or ()) for it in window]
            rows = [len(it.req.choices or ()) for it in window]
            lengths = [ln * r for ln, r in zip(lengths, rows, strict=True)]
            new = [n * r for n, r in zip(new, rows, strict=True)]
        else:
            new = [it.req.max_tokens for it in window]
        limit = None if head.scores else self.max_model_len
        for batch in plan(lengths, new, self.batch_tokens, self.max_batch_rows, limit):
            if 0 in batch:  # the head's
                picked = [window[i] for i in batch]
                taken = {id(it) for it in picked}
                self._pool = deque(it for it in self._pool if id(it) not in taken)
                return picked
        raise AssertionError("the plan lost the oldest request")

    def _run(self, items: list[_Item]) -> None:
        if not self.capabilities.prompted:
            self._classify_encoder(items)
        elif items[0].scores:
            self._classify_causal(items)
        else:
            self._generate(items)

    # --- the three kinds of step ----------------------------------------------------------

    def _generate(self, items: list[_Item]) -> None:
        torch = self._torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        # n > 1: n rows of the same prompt, gathered into one result at the end.
        rows = [(it, c) for it in items for c in range(max(1, it.req.n))]
        ids, mask = pad_rows([it.req.prompt_token_ids for it, _ in rows], self._pad, self.device)
        width = ids.shape[1]
        most = max(it.req.max_tokens for it, _ in rows)
        sampler = _RowSampler([(it.req, c) for it, c in rows], self._eos, width, self.device)
        watch = _Progress({id(it.batch): it.batch for it, _ in rows}, self._cancelled, rows)
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=most,
            do_sample=False,
            pad_token_id=self._pad,
            eos_token_id=self._eos or None,
        )
        with torch.inference_mode():
            out = self._model.generate(  # type: ignore[misc]
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler] if sampler.active else []),
                stopping_criteria=StoppingCriteriaList([watch]),
            )
        new = out[:, width:].tolist()
        eos = set(self._eos)
        for (it, _), tokens in zip(rows, new, strict=True):
            if id(it.batch) in self._cancelled:
                continue
            tokens = tokens[: it.req.max_tokens]
            end = next((k for k, t in enumerate(tokens) if t in eos), None)
            if end is not None:
                text_ids, reason, count = tokens[:end], "stop", end + 1
            else:
                text_ids, reason, count = tokens, "length", len(tokens)
            text = str(self._tok.decode(text_ids, skip_special_tokens=True))
            it.copies.append(GenResult(text=text, finish_reason=reason, completion_tokens=count))
            if len(it.copies) == max(1, it.req.n):
                it.batch.set(it.index, self._result(it))

    def _result(self, it: _Item) -> GenResult:
        first = it.copies[0]
        prompt = len(it.req.prompt_token_ids)
        if not it.req.wants_choices:
            return GenResult(
                text=first.text,
                finish_reason=first.finish_reason,
                prompt_tokens=prompt,
                completion_tokens=first.completion_tokens,
            )
        choices = tuple(Choice(c.text, c.finish_reason, c.completion_tokens) for c in it.copies)
        return GenResult(
            text=first.text,
            finish_reason=first.finish_reason,
            prompt_tokens=prompt,
            completion_tokens=sum(c.completion_tokens for c in choices),
            choices=choices,
        )

    def _label(self, label: str) -> list[int]:
        """A label's continuation: its tokens, then EOS (so a label that is a prefix of
        another is not favoured by being shorter)."""
        ids = self._label_ids.get(label)
        if ids is None:
            ids = list(self._tok(label, add_special_tokens=False).input_ids) + self._eos[:1]
            self._label_ids[label] = ids
        return ids

    def _classify_causal(self, items: list[_Item]) -> None:
        torch = self._torch
        pairs = [(it, label) for it in items for label in it.req.choices or ()]
        conts = [self._label(label) for _, label in pairs]
        ids, mask = pad_rows(
            [it.req.prompt_token_ids + cont for (it, _), cont in zip(pairs, conts, strict=True)],
            self._pad,
            self.device,
        )
        keep = max(len(c) for c in conts) + 1
        with torch.inference_mode():
            logits = self._model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # [rows, keep, vocab]
        scores = []
        for row, cont in enumerate(conts):
            # Left-padded, the continuation ends each row: its k tokens are predicted at the
            # k positions before the last.
            k = len(cont)
            steps = logp[row, keep - 1 - k : keep - 1]
            target = torch.tensor(cont, device=steps.device)
            scores.append(steps.gather(1, target[:, None]).sum().item())
        at = 0
        for it in items:
            labels = it.req.choices or ()
            mine = torch.tensor(scores[at : at + len(labels)])
            at += len(labels)
            if id(it.batch) in self._cancelled:
                continue
            probs = torch.softmax(mine, dim=0)
            best = int(torch.argmax(probs))
            tokens = len(self._label(labels[best]))
            it.batch.set(it.index, _labelled(it, labels[best], float(probs[best]), tokens))

    def _classify_encoder(self, items: list[_Item]) -> None:
        torch = self._torch
        labels = self.capabilities.labels or ()
        ids, mask = pad_rows(
            [it.req.prompt_token_ids for it in items], self._pad, self.device, left=False
        )
        with torch.inference_mode():
            logits = self._model(input_ids=ids, attention_mask=mask).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        for it, p in zip(items, probs, strict=True):
            if id(it.batch) in self._cancelled:
                continue
            asked = it.req.choices or labels
            unknown = [x for x in asked if x not in labels]
            if unknown:
                it.batch.set(
                    it.index,
                    GenResult(
                        error=f"labels {unknown} are not this classifier's: {list(labels)}",
                        prompt_tokens=len(it.req.prompt_token_ids),
                    ),
                )
                continue
            best = int(torch.argmax(p))
            it.batch.set(it.index, _labelled(it, labels[best], float(p[best]), 0))


def _labelled(it: _Item, label: str, confidence: float, tokens: int) -> GenResult:
    return GenResult(
        text=label,
        finish_reason="stop",
        prompt_tokens=len(it.req.prompt_token_ids),
        completion_tokens=tokens,
        confidence=confidence,
    )


class _RowSampler:
    """A logits processor that samples each sampled row with its own temperature, ``top_p``
    and seed, and ends each row at its own ``max_tokens``, inside one greedy ``generate``
    call: a sampled row's logits become its drawn token alone, so the greedy pick takes it.
    Greedy rows are left as they are. Probabilities are computed for all sampled rows at once;
    unseeded rows draw together, a seeded row from its own generator (reproducible)."""

    def __init__(
        self, rows: list[tuple[GenRequest, int]], eos: list[int], width: int, device: str
    ) -> None:
        import torch

        self.width = width
        self.eos = eos[0] if eos else None
        self.limits = torch.tensor([req.max_tokens for req, _ in rows], device=device)
        self.ragged = len({req.max_tokens for req, _ in rows}) > 1 and self.eos is not None
        sampled = [(row, req, copy) for row, (req, copy) in enumerate(rows) if req.temperature > 0]
        self.rows = torch.tensor([row for row, _, _ in sampled], dtype=torch.long, device=device)
        self.temperature = torch.tensor(
            [req.temperature for _, req, _ in sampled], device=device
        ).unsqueeze(1)
        self.top_p = torch.tensor([req.top_p for _, req, _ in sampled], device=device)
        self.nucleus = any(req.top_p < 1.0 for _, req, _ in sampled)
        self.seeded: list[tuple[int, Any]] = []  # (position among the sampled, its generator)
        for at, (_, req, copy) in enumerate(sampled):
            if req.seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(req.seed + copy)
                self.seeded.append((at, gen))
        seeded = {at for at, _ in self.seeded}
        self.free = torch.tensor(
            [at for at in range(len(sampled)) if at not in seeded], dtype=torch.long, device=device
        )
        self.active = bool(sampled) or self.ragged

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if len(self.rows):
            probs = torch.softmax(scores[self.rows].float() / self.temperature, dim=-1)
            if self.nucleus:  # keep the smallest set of tokens whose mass reaches top_p
                sorted_p, order = torch.sort(probs, dim=-1, descending=True)
                drop = torch.cumsum(sorted_p, dim=-1) - sorted_p > self.top_p.unsqueeze(1)
                probs = torch.zeros_like(probs).scatter(1, order, sorted_p.masked_fill(drop, 0.0))
            drawn = torch.empty(len(self.rows), dtype=torch.long, device=probs.device)
            if len(self.free):
                drawn[self.free] = torch.multinomial(probs[self.free], 1).squeeze(1)
            for at, gen in self.seeded:
                drawn[at] = torch.multinomial(probs[at], 1, generator=gen)[0]
            picked = torch.full_like(scores[self.rows], float("-inf"))
            picked.scatter_(1, drawn.unsqueeze(1), 0.0)
            scores[self.rows] = picked
        if self.ragged:  # a row past its own max_tokens: EOS ends its part of the call
            done = (input_ids.shape[1] - self.width) >= self.limits
            if bool(done.any()):
                scores[done] = float("-inf")
                scores[done, self.eos] = 0.0
        return scores


class _Progress:
    """A stopping criterion that marks the batches of a ``generate`` call as progressing at
    every step (the heartbeat's progress deadline) and stops the rows of a cancelled batch."""

    def __init__(
        self, batches: dict[int, Batch], cancelled: set[int], rows: list[tuple[_Item, int]]
    ) -> None:
        self.batches = batches
        self.cancelled = cancelled
        self.owners = [id(it.batch) for it, _ in rows]
        self.marked = 0.0

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        now = time.monotonic()
        if now - self.marked >= 0.5:
            self.marked = now
            for b in self.batches.values():
                b.progress()
        stop = [owner in self.cancelled for owner in self.owners]
        return torch.tensor(stop, device=input_ids.device)
