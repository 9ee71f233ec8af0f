"""vLLM engine: one ``LLMEngine`` per worker process, driven by a dedicated thread.

The driver thread is the only code that touches the engine: it adds the requests chunk tasks
submit, steps the engine while anything is unfinished, and hands finished outputs back to the
waiting batches. Chunk tasks (Celery pool threads) render, tokenize and write to Postgres on
their own threads, so none of that sits on the engine's critical path, and several chunks in
flight keep the engine's batch full across chunk boundaries — the same loop ``LLM.generate``
runs, fed continuously instead of once.

A fast GPU makes tokens faster than one Python thread handles per-token outputs, so the front
end does as little as it can per token (scripts/bench/frontend.py measures it): requests ask
vLLM for their final output only (``RequestOutputKind.FINAL_ONLY``: no ``RequestOutput`` per
token, none for the driver to handle), and, with a byte-level tokenizer, without vLLM's
token-by-token detokenization: the driver decodes each finished output once
(``_final_text``, the same text). Requests with stop strings or logprobs keep vLLM's
detokenizer, which they need. Since no output reports a token any more, a step's return is
the engine's sign of life: the driver marks the batches in flight as progressing (at most
every ``PROGRESS_EVERY_S``), which the heartbeat's stall deadline reads (``workers.runtime``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from service.batches.requests import LOGPROB_FLOOR
from service.errors import EngineDeadError
from workers.engines.base import (
    Batch,
    Choice,
    GenRequest,
    GenResult,
    ThreadTokenizers,
    TokenLogprob,
)

if TYPE_CHECKING:
    from service.jobs.validate import ModelCapabilities

log = logging.getLogger(__name__)

#: How often, at most, a step that returned marks the batches in flight as progressing.
PROGRESS_EVERY_S = 0.5


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always comes with vllm
        return True


def engine_kwargs(
    model: str,
    *,
    device: str,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    max_num_seqs: int | None = None,
    dtype: str = "auto",
    enforce_eager: bool | None = None,
    tensor_parallel_size: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """The vLLM engine arguments a docqueue worker runs with. Benchmarks and the fidelity test
    build their raw ``LLM(**engine_kwargs(...))`` from the same function, so "raw vLLM" there
    means the very engine configuration docqueue uses."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    eager = bool(enforce_eager)  # None: compiled, vLLM's own default, on CPU hosts too
    if device == "cpu" and not eager:
        # Eager mode costs vLLM-CPU 7-10% of its output tokens/s. A compiled start reads
        # torch inductor's cache (TORCHINDUCTOR_CACHE_DIR, /tmp/torchinductor_$USER): the
        # first start on a host fills it (a minute or more), later ones compile in 7-15 s.
        # vLLM 0.32's own AOT compile cache never loads on CPU (its artifact has no
        # finalize_loading), so with it every start recompiles, ~30 s: turned off.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        log.info(
            "vLLM runs compiled on this CPU host: the first start on a host compiles for a "
            "minute or more, later ones 7-15 s; DOCQUEUE_VLLM_ENFORCE_EAGER=true starts at "
            "once at 7-10%% fewer tokens/s"
        )
    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "seed": seed,
        "gpu_memory_utilization": gpu_memory_utilization,
        "tensor_parallel_size": tensor_parallel_size,
        "enforce_eager": eager,
        "disable_log_stats": True,
        # Logprobs after the structured-output mask: a label's confidence is then its
        # probability among the allowed continuations, not among the whole vocabulary.
        "logprobs_mode": "processed_logprobs",
    }
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if max_num_seqs:
        kwargs["max_num_seqs"] = max_num_seqs
    if device == "cpu":
        # vLLM-CPU kills its engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split across steps: torch's CPU generators cannot rewind.
        # Without chunked prefill no prompt is split; a step then must hold the longest one.
        probe = EngineArgs(**kwargs).create_engine_config(UsageContext.LLM_CLASS)
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(
            probe.model_config.max_model_len, probe.scheduler_config.max_num_batched_tokens
        )
    return kwargs


class VllmEngine:
    capabilities: ModelCapabilities | None = None  # a causal LM: every task

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_gib: float = 2.0,
        max_num_seqs: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        engine_args: Mapping[str, Any] | None = None,
        outputs: Literal["final", "stream"] = "final",
    ) -> None:
        """``engine_args``: vLLM engine arguments over docqueue's (the front-end benchmark's
        stub executor, ``workers.engines.stub_executor``). ``outputs="stream"`` is the former
        design (an output per token, each a progress mark), kept so the front-end benchmark
        measures both side by side; the results are the same."""
        self.device = "cpu" if _on_cpu() else "cuda"
        if self.device == "cpu":
            # The CPU backend otherwise reserves gpu_memory_utilization of the node's RAM and
            # refuses to start when less is free; a fixed KV cache size avoids that.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        started = time.monotonic()
        kwargs = engine_kwargs(
            model,
            device=self.device,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            dtype=dtype,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
        )
        args = EngineArgs(**{**kwargs, **(engine_args or {})})
        # Offline batch inference is what `LLM` does: take its batch defaults (CPU: 256
        # sequences and 4,096 batched tokens a step; big GPUs: 1,024 and 16,384), not those of
        # a bare engine (128 and 2,048), which halve the batch.
        self._engine = LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        self.start_s = time.monotonic() - started
        self.model = model
        self.outputs = outputs
        # The backend that decodes finished outputs; None: vLLM detokenizes every request.
        self._decoder = _bytelevel_decoder(self._engine) if outputs == "final" else None
        self.max_model_len = int(self._engine.model_config.max_model_len)
        self._tokenizers = ThreadTokenizers(model)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._drive, name="vllm-driver", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True).start()
        log.info("vllm engine for %s ready in %.1f s on %s", model, self.start_s, self.device)

    # --- used by chunk tasks (any thread) -------------------------------------------------

    def tokenizer(self) -> Any:
        return self._tokenizers.get()

    def submit(self, requests: list[GenRequest]) -> Batch:
        batch = Batch(len(requests))
        if self._dead is not None:
            batch.fail(EngineDeadError(f"engine is dead: {self._dead}"))
            return batch
        if requests:
            batch.request_ids = [str(next(self._ids)) for _ in requests]
            self._inbox.put(("submit", (batch, requests)))
        return batch

    def cancel(self, batch: Batch) -> None:
        if not batch.done:
            self._inbox.put(("abort", batch))

    def close(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)
        # Stop the engine-core process explicitly: left running, interpreter exit would wait
        # on it forever (multiprocessing joins its children at exit).
        core = getattr(self._engine, "engine_core", None)
        shutdown = getattr(core, "shutdown", None) or getattr(self._engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    @property
    def alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    # --- the driver thread ----------------------------------------------------------------

    def _watch(self) -> None:
        """Unblocks the driver when the engine-core process dies.

        vLLM's client notices the death (its monitor thread sets ``engine_dead``) but a
        synchronous ``step()`` already waiting for outputs would wait forever; feeding the
        error into the queue it waits on makes the driver fail the batches in flight, so the
        chunk tasks give their chunks back instead of hanging with live leases.
        """
        core = getattr(self._engine, "engine_core", None)
        resources = getattr(core, "resources", None)
        outputs = getattr(core, "outputs_queue", None)
        if resources is None or outputs is None:
            return
        while self._thread.is_alive():
            if getattr(resources, "engine_dead", False):
                from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

                log.error("vllm engine-core process died")
                outputs.put_nowait(VllmDead())
                return
            time.sleep(0.5)

    def _core_dead(self) -> bool:
        resources = getattr(getattr(self._engine, "engine_core", None), "resources", None)
        return bool(getattr(resources, "engine_dead", False))

    def _params(self, req: GenRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kw: dict[str, Any] = {
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "seed": req.seed,
        }
        if self.outputs == "final" or req.n != 1:
            # One output when the request ends; with n > 1, one with all n completions when
            # the last one ends (streamed outputs of a parent request end, "finished", with the
            # first child that does).
            kw["output_kind"] = RequestOutputKind.FINAL_ONLY
        if req.n != 1 and req.temperature > 0:
            # vLLM refuses n > 1 when greedy (every choice would be the same); OpenAI answers
            # it with n equal choices, so the driver decodes one and copies it (``_convert``).
            kw["n"] = req.n
        if req.top_p != 1.0:
            kw["top_p"] = req.top_p
        if req.stop:
            kw["stop"] = list(req.stop)
        if req.presence_penalty:
            kw["presence_penalty"] = req.presence_penalty
        if req.frequency_penalty:
            kw["frequency_penalty"] = req.frequency_penalty
        if req.logprobs is not None:
            kw["logprobs"] = req.logprobs
        if req.choices:
            kw["structured_outputs"] = StructuredOutputsParams(choice=list(req.choices))
            kw["logprobs"] = 0  # the sampled tokens' logprobs: the label's confidence
        elif req.json_schema is not None:
            kw["structured_outputs"] = StructuredOutputsParams(json=json.loads(req.json_schema))
        elif req.json_object:
            kw["structured_outputs"] = StructuredOutputsParams(json_object=True)
        if self._decoder is not None and not req.stop and "logprobs" not in kw:
            # The driver decodes the text once the request ends (``_final_text``): vLLM's
            # token-by-token detokenizer was most of the front end's CPU a token. Stop strings
            # and logprobs need vLLM's.
            kw["detokenize"] = False
        return SamplingParams(**kw)

    def _drive(self) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

        engine = self._engine
        pending: dict[str, tuple[Batch, int, int, bool, Any, int]] = {}
        marked = 0.0
        try:
            while True:
                busy = engine.has_unfinished_requests()
                try:
                    cmd, arg = self._inbox.get(block=not busy, timeout=None if busy else 1.0)
                except queue.Empty:
                    cmd, arg = "", None
                while cmd:
                    if cmd == "stop":
                        return
                    if cmd == "submit":
                        batch, requests = arg
                        for i, (rid, req) in enumerate(
                            zip(batch.request_ids, requests, strict=True)
                        ):
                            try:
                                params = self._params(req)
                                engine.add_request(
                                    rid,
                                    TokensPrompt(prompt_token_ids=req.prompt_token_ids),
                                    params,
                                )
                            except Exception as exc:
                                if isinstance(exc, VllmDead) or self._core_dead():
                                    # Not this prompt's fault: the engine died under it. Fail
                                    # the whole batch (its chunk is retried), stop the driver.
                                    batch.fail(EngineDeadError(str(exc)))
                                    raise
                                # This prompt only (too long, bad parameters): the row's error.
                                batch.set(
                                    i,
                                    GenResult(
                                        error=f"engine rejected the prompt: {exc}",
                                        prompt_tokens=len(req.prompt_token_ids),
                                    ),
                                )
                            else:
                                pending[rid] = (
                                    batch,
                                    i,
                                    len(req.prompt_token_ids),
                                    req.wants_choices,
                                    None if params.detokenize else self._decoder,
                                    req.n if params.n == 1 else 1,
                                )
                    elif cmd == "abort":
                        ids = [rid for rid in arg.request_ids if rid in pending]
                        if ids:
                            engine.abort_request(ids)
                            for rid in ids:
                                pending.pop(rid, None)
                    try:
                        cmd, arg = self._inbox.get_nowait()
                    except queue.Empty:
                        cmd = ""
                if not engine.has_unfinished_requests():
                    continue
                for out in engine.step():
                    slot = pending.get(out.request_id)
                    if slot is None:
                        continue
                    batch, i, n_prompt, wants, decoder, copies = slot
                    if not out.finished:
                        batch.progress()  # a token: the engine is not hung
                        continue
                    del pending[out.request_id]
                    batch.set(i, _convert(out, n_prompt, wants, decoder, copies))
                now = time.monotonic()
                if now - marked >= PROGRESS_EVERY_S:
                    # A step returned: the engine is not hung, whether or not a request ended.
                    marked = now
                    for batch in {id(b): b for b, *_ in pending.values()}.values():
                        batch.progress()
        except BaseException as exc:  # the engine died: fail what is in flight, loudly
            log.exception("vllm engine driver stopped")
            self._dead = exc
            for batch, *_ in pending.values():
                batch.fail(EngineDeadError(str(exc)))
            while True:
                try:
                    cmd, arg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if cmd == "submit":
                    arg[0].fail(EngineDeadError(str(exc)))


def _confidence(comp: Any) -> float | None:
    """exp(sum of the label tokens' logprobs), leaving out the end-of-sequence token that the
    grammar forces after a complete label (several EOS ids would split its probability)."""
    if not comp.logprobs:
        return None
    lps = [
        step[tid].logprob
        for tid, step in zip(comp.token_ids, comp.logprobs, strict=False)
        if tid in step
    ]
    if comp.finish_reason == "stop" and comp.stop_reason is None and len(lps) > 1:
        lps = lps[:-1]
    return max(0.0, min(1.0, math.exp(sum(lps))))


def _convert(
    out: Any, n_prompt: int, wants_choices: bool = False, decoder: Any = None, copies: int = 1
) -> GenResult:
    """docqueue's result from vLLM's final output; ``decoder``: the tokenizer backend that
    makes the text of a request vLLM did not detokenize (``_final_text``); ``copies``: a greedy
    request's n, its one completion given n times."""
    comp = out.outputs[0]
    confidence = _confidence(comp)
    prompt_tokens = len(out.prompt_token_ids) if out.prompt_token_ids is not None else n_prompt
    if not wants_choices:
        return GenResult(
            text=_text(comp, decoder, out.prompt_token_ids),
            finish_reason=comp.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(comp.token_ids),
            confidence=confidence,
        )
    choices = (
        tuple(
            Choice(
                _text(c, decoder, out.prompt_token_ids),
                c.finish_reason,
                len(c.token_ids),
                _token_logprobs(c),
            )
            for c in sorted(out.outputs, key=lambda c: c.index)
        )
        * copies
    )
    return GenResult(
        text=choices[0].text,
        finish_reason=choices[0].finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=sum(c.completion_tokens for c in choices),
        confidence=confidence,
        choices=choices,
    )


def _text(comp: Any, decoder: Any, prompt_ids: list[int] | None) -> str:
    if decoder is None:
        return str(comp.text)  # vLLM detokenized this one
    # vLLM leaves the token that stopped the request (EOS, a stop token id) out of the text.
    ids = list(comp.token_ids[:-1] if comp.finish_reason == "stop" else comp.token_ids)
    return _final_text(decoder, prompt_ids, ids)


def _final_text(decoder: Any, prompt_ids: list[int] | None, ids: list[int]) -> str:
    """The text vLLM's incremental detokenizer makes of these output ids, in one decode.

    vLLM feeds each token to tokenizers' ``DecodeStream``, which emits the new text of its
    window unless that ends in U+FFFD (a character still incomplete). With a byte-level
    decoder decoding is local (each token's bytes, concatenated, read as UTF-8 once), so when
    the whole output's decode does not end in U+FFFD it is the stream's text. When it does,
    the stream held text back that it never emitted: the output is replayed through
    ``DecodeStream`` as vLLM feeds it (rare, and linear). ``tests/unit/workers/engines/
    test_vllm_text.py`` checks both against vLLM's own detokenizer."""
    text: str = decoder.decode(ids, skip_special_tokens=True)
    if not text.endswith("\ufffd"):
        return text
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=list(prompt_ids or ()), skip_special_tokens=True)
    pieces = []
    for token in ids:
        try:
            piece = stream.step(decoder, token)
        except Exception as exc:
            if not str(exc).startswith("Invalid prefix encountered"):
                raise
            # vLLM's recovery (its FastIncrementalDetokenizer): a fresh stream, no prompt.
            stream = DecodeStream(skip_special_tokens=True)
            piece = stream.step(decoder, token)
        if piece:
            pieces.append(piece)
    return "".join(pieces)


def _bytelevel_decoder(engine: Any) -> Any:
    """vLLM's tokenizer's Rust backend when ``_final_text`` gives what vLLM's detokenizer
    would (a fast tokenizer with a byte-level decoder: Llama 3, Qwen, SmolLM, GPT-2 and most
    byte-level BPE models); None keeps vLLM's detokenizer for every request."""
    from tokenizers import decoders
    from vllm.v1.engine.detokenizer import uses_fast_detokenizer

    tokenizer = getattr(engine.output_processor, "tokenizer", None)
    if tokenizer is None or not uses_fast_detokenizer(tokenizer):
        return None
    backend = tokenizer._tokenizer
    return backend if isinstance(backend.decoder, decoders.ByteLevel) else None


def _token_logprobs(comp: Any) -> tuple[TokenLogprob, ...] | None:
    """Each sampled token with its logprob and the step's likeliest alternatives, as vLLM
    decoded them (None: the request asked for none)."""
    if comp.logprobs is None:
        return None
    out = []
    for tid, step in zip(comp.token_ids, comp.logprobs, strict=False):
        chosen = step.get(tid)
        ranked = sorted(
            (lp for t, lp in step.items() if lp.rank is not None and lp.rank > 0),
            key=lambda lp: lp.rank,
        )
        out.append(
            TokenLogprob(
                token=(chosen.decoded_token if chosen is not None else None) or "",
                logprob=float(chosen.logprob) if chosen is not None else LOGPROB_FLOOR,
                top=tuple((lp.decoded_token or "", float(lp.logprob)) for lp in ranked),
            )
        )
    return tuple(out)
