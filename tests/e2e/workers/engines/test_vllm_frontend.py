"""docqueue's driver over vLLM's real front end and engine core, with the stub executor
(``workers.engines.stub_executor``) in place of the model: what the stub emits, and the
progress a long output reports while vLLM returns only final outputs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.support.models import tiny_model
from workers.engines.base import GenRequest
from workers.engines.stub_executor import StubExecutor, prompt_seed, stub_config
from workers.engines.vllm_engine import VllmEngine

STEP_MS = 20.0
EOS_EVERY = 2


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(tiny_model())


@pytest.fixture(scope="module")
def stream(tokenizer: Any) -> list[int]:
    text = "The council voted to add bike lanes downtown, citing traffic and safety. " * 4
    ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
    return ids


@pytest.fixture(scope="module")
def stub(
    stream: list[int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VllmEngine, Path]]:
    """The engine, and the stub's control file (its step time in ms)."""
    saved = os.environ.get("VLLM_CPU_KVCACHE_SPACE")  # the engine sets it on CPU hosts
    control = tmp_path_factory.mktemp("stub") / "step_ms"
    control.write_text("0")
    extra = stub_config(stream, eos_every=EOS_EVERY, kv_cache_gib=1, control_path=str(control))
    eng = VllmEngine(
        tiny_model(),
        max_model_len=512,
        kv_cache_gib=1,
        engine_args={"distributed_executor_backend": StubExecutor, "additional_config": extra},
    )
    yield eng, control
    eng.close()
    if saved is None:  # later tests' worker processes inherit this process's environment
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved


def expected_ids(stream: list[int], prompt: list[int], max_tokens: int) -> tuple[list[int], bool]:
    """What the stub emits for this prompt (the output ids, whether it ended with EOS)."""
    seed = prompt_seed(prompt)
    ids = [stream[(seed + i) % len(stream)] for i in range(max_tokens)]
    if seed % EOS_EVERY == 0:
        eos_at = max(1, max_tokens // 2 + seed % max(1, max_tokens // 2)) - 1
        return ids[:eos_at], True
    return ids, False


def test_the_stub_core_emits_its_stream_through_the_real_front_end(
    stub: tuple[VllmEngine, Path], tokenizer: Any, stream: list[int]
) -> None:
    engine, control = stub
    control.write_text("0")
    prompts = [stream[i : i + 5 + i % 7] for i in range(12)]
    batch = engine.submit([GenRequest(p, max_tokens=24) for p in prompts])
    assert batch.wait(120) and batch.failure is None
    ended_by_eos = 0
    for prompt, res in zip(prompts, batch.results, strict=True):
        assert res is not None and res.error is None
        ids, eos = expected_ids(stream, prompt, 24)
        ended_by_eos += eos
        assert res.finish_reason == ("stop" if eos else "length")
        # The EOS token counts as a completion token and adds no text, as with a model.
        assert res.completion_tokens == len(ids) + eos
        assert res.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert res.prompt_tokens == len(prompt)
    assert 0 < ended_by_eos < len(prompts)  # both endings were exercised


def test_a_long_output_reports_progress_before_it_ends(
    stub: tuple[VllmEngine, Path], stream: list[int]
) -> None:
    """vLLM returns nothing until a request ends, so the driver marks the batches in flight
    after each step: the heartbeat must not take a long output for a hung engine."""
    engine, control = stub
    control.write_text(f"{STEP_MS}")
    # A prompt whose output runs to max_tokens (no early EOS).
    prompt = next(p for i in range(30) if prompt_seed(p := stream[i : i + 8]) % EOS_EVERY)
    time.sleep(0.5)  # the stub re-reads its control file every 0.2 s
    # 100 steps of at least STEP_MS: at least 2 s, four times the marking interval.
    batch = engine.submit([GenRequest(prompt, max_tokens=100)])
    while batch.progressed_at is None and not batch.done:
        time.sleep(0.01)
    marked_while_running = not batch.done
    assert batch.wait(120) and batch.failure is None
    control.write_text("0")
    assert marked_while_running, "no progress before the output ended"
    res = batch.results[0]
    assert res is not None and res.completion_tokens == 100
