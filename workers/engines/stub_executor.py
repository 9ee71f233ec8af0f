"""A vLLM executor with no model: real token ids at a set pace, for front-end benchmarks.

vLLM runs whatever ``Executor`` subclass ``distributed_executor_backend`` names, so with this
one everything else is vLLM's own: the engine-core process, its scheduler and KV-cache
bookkeeping, the msgpack/ZMQ hop back, and in the worker process the input processor, the
output processor with its detokenizer, and docqueue's driver thread. Only the forward pass and
the sampler are replaced: each scheduled request whose prompt is complete gets its next token
from a fixed stream of real text's token ids (so detokenizing costs what it costs on real
output), and a step takes at least ``stub_step_ms`` (0: as fast as the core loop goes), which
sets the offered rate: running sequences / step time. No KV cache is allocated.

Configured through vLLM's ``additional_config``, which reaches the engine-core process with
the rest of the config (``stub_config`` builds it): ``stub_token_ids``, the stream;
``stub_step_ms``; ``stub_eos_every``, every k-th prompt's output ends with EOS before
``max_tokens`` (0: none); ``stub_kv_cache_gib``, the KV cache the scheduler believes in; and
``stub_control_path``, a file whose number, when it is there, replaces ``stub_step_ms``
(re-read every 0.2 s, so a benchmark sweeps the rate without restarting the engine). Never
used by a worker: ``scripts/bench/frontend.py`` and the engine tests pass it to
``VllmEngine(engine_args=...)``.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.outputs import ModelRunnerOutput

if TYPE_CHECKING:
    import torch

_GIB = 1 << 30


def stub_config(
    token_ids: list[int],
    *,
    step_ms: float = 0.0,
    eos_every: int = 0,
    kv_cache_gib: float = 2.0,
    control_path: str | None = None,
) -> dict[str, Any]:
    """The ``additional_config`` entries this executor reads."""
    return {
        "stub_token_ids": [int(t) for t in token_ids],
        "stub_step_ms": float(step_ms),
        "stub_eos_every": int(eos_every),
        "stub_kv_cache_gib": float(kv_cache_gib),
        "stub_control_path": control_path or "",
    }


def prompt_seed(prompt_token_ids: list[int]) -> int:
    """Where in the stream a prompt's output starts (modulo its length) and whether it ends
    early: drawn from the prompt, so one prompt always gets one output, as under greedy
    decoding."""
    return zlib.crc32(array("q", prompt_token_ids).tobytes())


class StubExecutor(Executor):
    """``collective_rpc`` answers the few questions the engine core asks a worker at start
    (KV-cache specs and memory, layouts, tasks); ``execute_model`` samples from the stream."""

    def _init_executor(self) -> None:
        extra = self.vllm_config.additional_config
        assert isinstance(extra, dict) and extra.get("stub_token_ids"), "stub_token_ids missing"
        self._stream: list[int] = list(extra["stub_token_ids"])
        self._step_s = float(extra.get("stub_step_ms", 0.0)) / 1000.0
        self._eos_every = int(extra.get("stub_eos_every", 0))
        self._kv_bytes = int(float(extra.get("stub_kv_cache_gib", 2.0)) * _GIB)
        self._control = Path(extra["stub_control_path"]) if extra.get("stub_control_path") else None
        self._control_read = 0.0
        # Per request: (prompt length, offset into the stream, EOS position or -1, EOS id).
        self._reqs: dict[str, tuple[int, int, int, int]] = {}
        self._next_step = 0.0
        self.steps = 0
        self.tokens = 0

    # --- what the engine core asks at start --------------------------------------------------

    def _kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        mc, pc = self.vllm_config.model_config, self.vllm_config.parallel_config
        spec = FullAttentionSpec(
            block_size=self.vllm_config.cache_config.block_size or 16,
            num_kv_heads=mc.get_num_kv_heads(pc),
            head_size=mc.get_head_size(),
            dtype=cast("torch.dtype", mc.dtype),  # resolved from "auto" by now
        )
        return {f"model.layers.{i}.self_attn.attn": spec for i in range(mc.get_num_layers(pc))}

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        non_block: bool = False,
    ) -> Any:
        answers: dict[str, Callable[[], Any]] = {
            "get_kv_cache_spec": self._kv_cache_spec,
            "determine_available_memory": lambda: self._kv_bytes,
            "get_supported_kv_cache_layouts": lambda: ["LBNHC", "LBHNC"],
            "get_supported_tasks": lambda: ("generate",),
            "supports_draft_weight_updates": lambda: False,
        }
        answer = answers.get(method) if isinstance(method, str) else None
        result = [answer() if answer is not None else None]
        if method == "compile_or_warm_up_model":
            result = []  # no compilation times to report
        if non_block:
            future: Future[Any] = Future()
            future.set_result(result)
            return future
        return result

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None

    # --- a step ------------------------------------------------------------------------------

    def execute_model(  # type: ignore[override]
        self, scheduler_output: Any, non_block: bool = False
    ) -> ModelRunnerOutput | Future[ModelRunnerOutput]:
        out = self.step(scheduler_output)
        if non_block:
            future: Future[ModelRunnerOutput] = Future()
            future.set_result(out)
            return future
        return out

    def step(self, so: Any) -> ModelRunnerOutput:
        """The tokens of one step: one for every scheduled request whose prompt is then
        complete (a decode, or the prefill's last part), the next one of its stream."""
        for rid in so.finished_req_ids:
            self._reqs.pop(rid, None)
        computed: dict[str, int] = {}
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            seed = prompt_seed(new.prompt_token_ids or [])
            eos_at = -1
            eos_id = params.eos_token_id if params is not None else None
            if self._eos_every and eos_id is not None and seed % self._eos_every == 0:
                max_tokens = params.max_tokens or 16
                eos_at = max(1, max_tokens // 2 + seed % max(1, max_tokens // 2)) - 1
            self._reqs[new.req_id] = (
                len(new.prompt_token_ids or ()),
                seed % len(self._stream),
                eos_at,
                eos_id if eos_id is not None else 0,
            )
            computed[new.req_id] = new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for rid, done in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            computed[rid] = done
        req_ids: list[str] = []
        sampled: list[list[int]] = []
        for rid, n in so.num_scheduled_tokens.items():
            prompt_len, offset, eos_at, eos_id = self._reqs[rid]
            index = computed.get(rid, 0) + n - prompt_len  # the output token this step makes
            req_ids.append(rid)
            if index < 0:
                sampled.append([])  # a prefill part, not the last
            elif index == eos_at:
                sampled.append([eos_id])
            else:
                sampled.append([self._stream[(offset + index) % len(self._stream)]])
        self.steps += 1
        self.tokens += sum(len(s) for s in sampled)
        self._pace()
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
            sampled_token_ids=sampled,
        )

    def _pace(self) -> None:
        """Each step ends at least ``stub_step_ms`` after the previous one ended."""
        now = time.monotonic()
        if self._control is not None and now - self._control_read > 0.2:
            self._control_read = now
            with contextlib.suppress(OSError, ValueError):
                self._step_s = float(self._control.read_text()) / 1000.0
        if self._step_s <= 0:
            return
        if self._next_step > now:
            time.sleep(self._next_step - now)
            now = self._next_step
        self._next_step = now + self._step_s
