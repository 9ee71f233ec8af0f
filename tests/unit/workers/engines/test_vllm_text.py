"""The driver's one-decode text of a finished output (``_final_text``) against vLLM's own
incremental detokenizer, token by token as the engine feeds it, on the local models' real
byte-level tokenizers: real text cut anywhere (characters left incomplete at the end), random
ids from the whole vocabulary (invalid UTF-8 anywhere), special tokens, and outputs that end
with the stop token."""

from __future__ import annotations

import random
from typing import Any

import pytest
from vllm import SamplingParams
from vllm.tokenizers import get_tokenizer
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, IncrementalDetokenizer

from tests.support.models import smollm2_model, tiny_model
from workers.engines.vllm_engine import _final_text

TEXT = (
    "Café crème, naïve façade — 東京の天気は晴れ。 Ünïcödé ßtraße ✓ 😀🚀 👩‍💻 "
    "The council voted 7-2 to add bike lanes; «quotes» and \u2018curly\u2019 ones… ok."
)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return get_tokenizer(tiny_model() if request.param == "tiny" else smollm2_model())


def vllm_text(tokenizer: Any, prompt: list[int], ids: list[int], stopped: bool) -> str:
    """What vLLM's output processor makes of these ids, one step per token; ``stopped``: the
    last one stopped the request (EOS or a stop token id)."""
    request = EngineCoreRequest(
        request_id="r",
        prompt_token_ids=prompt,
        mm_features=None,
        sampling_params=SamplingParams(max_tokens=max(1, len(ids))),
        pooling_params=None,
        arrival_time=0.0,
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=None,
    )
    detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
    assert isinstance(detokenizer, FastIncrementalDetokenizer)
    for k, token in enumerate(ids):
        detokenizer.update([token], stopped and k == len(ids) - 1)
    return detokenizer.get_next_output_text(finished=True, delta=False)


def driver_text(tokenizer: Any, prompt: list[int], ids: list[int], stopped: bool) -> str:
    return _final_text(tokenizer._tokenizer, prompt, ids[:-1] if stopped else ids)


def test_real_text_cut_anywhere(tokenizer: Any) -> None:
    prompt = tokenizer("Summarize:", add_special_tokens=False).input_ids
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    cut_mid_character = 0
    for end in range(len(ids) + 1):
        expected = vllm_text(tokenizer, prompt, ids[:end], stopped=False)
        assert driver_text(tokenizer, prompt, ids[:end], stopped=False) == expected, end
        cut_mid_character += expected != tokenizer.decode(ids[:end])
    assert cut_mid_character > 0  # the held-back endings were exercised


def test_random_ids_special_tokens_and_stops(tokenizer: Any) -> None:
    rng = random.Random(14)
    prompt = tokenizer("Question?", add_special_tokens=False).input_ids
    vocab = len(tokenizer)
    special = sorted(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id
    differs = 0
    for case in range(400):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
        if case % 5 == 0:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        stopped = case % 3 == 0
        if stopped:
            ids.append(eos)
        expected = vllm_text(tokenizer, prompt, ids, stopped)
        assert driver_text(tokenizer, prompt, ids, stopped) == expected, (case, ids)
        differs += expected != tokenizer.decode(ids[:-1] if stopped else ids)
    assert differs > 0  # plain decoding would have been wrong somewhere
