"""What an OpenAI request may ask of the engine, on real vLLM (the tiny model, in-process):
several choices, stop strings, a JSON schema the output must match, and logprobs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import pytest

from tests.support.models import VERDICT_SCHEMA, tiny_model
from workers.engines.base import GenRequest, GenResult
from workers.engines.vllm_engine import VllmEngine


@pytest.fixture(scope="module")
def engine() -> Iterator[VllmEngine]:
    saved = os.environ.get("VLLM_CPU_KVCACHE_SPACE")  # the engine sets it on CPU hosts
    eng = VllmEngine(tiny_model(), max_model_len=512, kv_cache_gib=1, enforce_eager=True)
    yield eng
    eng.close()
    if saved is None:  # later tests' worker processes inherit this process's environment
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved


def run(engine: VllmEngine, *requests: GenRequest) -> list[GenResult]:
    batch = engine.submit(list(requests))
    assert batch.wait(120), "the engine returned nothing in 120 s"
    assert batch.failure is None
    return [r for r in batch.results if r is not None]


def prompt(engine: VllmEngine, text: str = "Is the sky blue?") -> list[int]:
    ids: list[int] = engine.tokenizer()(text).input_ids
    return ids


def test_n_choices_each_its_own_and_their_tokens_summed(engine: VllmEngine) -> None:
    (res,) = run(engine, GenRequest(prompt(engine), max_tokens=12, temperature=1.0, seed=7, n=3))
    assert res.choices is not None and len(res.choices) == 3
    assert res.text == res.choices[0].text
    assert res.completion_tokens == sum(c.completion_tokens for c in res.choices)
    assert all(
        c.completion_tokens >= 1 and c.finish_reason in ("stop", "length") for c in res.choices
    )
    assert len({c.text for c in res.choices}) > 1  # sampled apart (random weights: no ties)


def test_a_stop_string_ends_the_output_before_it(engine: VllmEngine) -> None:
    (free,) = run(engine, GenRequest(prompt(engine), max_tokens=40, temperature=0.0))
    assert len(free.text) > 4
    stop = free.text[2:4]  # text the greedy output is known to reach
    (cut,) = run(engine, GenRequest(prompt(engine), max_tokens=40, temperature=0.0, stop=(stop,)))
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert free.text.startswith(cut.text)


def test_a_json_schema_output_parses_and_matches_it(engine: VllmEngine) -> None:
    requests = [
        GenRequest(prompt(engine, f"Question {i}?"), max_tokens=64, temperature=1.0, seed=i,
                   json_schema=json.dumps(VERDICT_SCHEMA))
        for i in range(4)
    ]  # fmt: skip
    for res in run(engine, *requests):
        value = json.loads(res.text)
        assert set(value) == {"answer", "sure"}, res.text
        assert value["answer"] in ("yes", "no") and isinstance(value["sure"], bool)
    (obj,) = run(
        engine, GenRequest(prompt(engine), max_tokens=64, temperature=0.0, json_object=True)
    )
    if obj.finish_reason == "stop":  # an unbounded object may run out of tokens first
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.text.lstrip().startswith("{")


def test_logprobs_name_each_token_and_its_alternatives(engine: VllmEngine) -> None:
    (res,) = run(engine, GenRequest(prompt(engine), max_tokens=6, temperature=0.0, logprobs=3))
    assert res.choices is not None
    (choice,) = res.choices
    assert choice.logprobs is not None and len(choice.logprobs) == choice.completion_tokens
    assert "".join(t.token for t in choice.logprobs) == choice.text
    for step in choice.logprobs:
        assert step.logprob <= 0 and len(step.top) == 3
        # Greedy: the chosen token is the likeliest, so the first alternative is no likelier.
        assert step.top[0][1] <= step.logprob + 1e-6
        assert all(math.isfinite(lp) for _, lp in step.top)


def test_final_outputs_equal_streamed_ones(engine: VllmEngine) -> None:
    """The driver asks vLLM for final outputs only and decodes the text itself; the former
    design took an output per token, detokenized by vLLM. Users must get the same results
    either way: text, finish reasons, token counts, every choice and logprob."""
    requests = [
        GenRequest(prompt(engine), max_tokens=30, temperature=0.0),
        GenRequest(prompt(engine, "Name a color."), max_tokens=20, temperature=1.0, seed=3),
        GenRequest(prompt(engine), max_tokens=12, temperature=1.0, seed=7, n=3),
        GenRequest(prompt(engine), max_tokens=6, temperature=0.0, logprobs=2),
        GenRequest(prompt(engine), max_tokens=40, temperature=0.0, stop=("e",)),
        GenRequest(prompt(engine), max_tokens=64, temperature=1.0, seed=1,
                   json_schema=json.dumps(VERDICT_SCHEMA)),
        GenRequest(prompt(engine), max_tokens=4, choices=("yes", "no")),
    ]  # fmt: skip
    assert engine.outputs == "final"
    assert engine._decoder is not None  # byte-level: the driver decodes the plain requests
    final = run(engine, *requests)
    engine.outputs = "stream"
    try:
        streamed = run(engine, *requests)
    finally:
        engine.outputs = "final"
    assert final == streamed
    assert {r.finish_reason for r in final} >= {"stop", "length"}
