"""The transformers engine on the tiny Llama (real torch and transformers, CPU): greedy outputs
equal a plain ``model.generate`` on the same left-padded batches, per-row sampling and limits,
classify by label scores equal to a direct forward pass, and the token-budget plan."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from workers.engines.base import GenRequest
from workers.engines.transformers_engine import (
    TransformersEngine,
    capabilities_of,
    pad_rows,
    plan,
)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def engine() -> Any:
    from tests.support.models import tiny_model

    eng = TransformersEngine(tiny_model(), batch_tokens=2_000, max_batch_rows=8)
    yield eng
    eng.close()


def prompts(engine: Any, n: int) -> list[list[int]]:
    tok = engine.tokenizer()
    texts = [
        f"Report {i}: " + " ".join(f"item{(i * 7 + k) % 97}" for k in range(i % 9))
        for i in range(n)
    ]
    return [list(tok(t).input_ids) for t in texts]


def plain_generate(engine: Any, rows: list[list[int]], max_new: int) -> list[list[int]]:
    """What a hand-written loop gets from ``model.generate`` on one left-padded batch."""
    ids, mask = pad_rows(rows, engine._pad)
    with torch.inference_mode():
        out = engine._model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=engine._pad,
        )
    return [list(map(int, r)) for r in out[:, ids.shape[1] :]]


def test_plan_sorts_by_length_and_packs_by_token_budget() -> None:
    lengths = [50, 10, 30, 12, 400]
    batches = plan(lengths, [10] * 5, budget_tokens=100, max_rows=8)
    # Sorted: 10, 12, 30 (3 x 40 = 120 > 100, so 10 and 12 go alone: 2 x 22), then 30 and 50
    # would be 2 x 60 = 120: each alone; 400 is over the budget and still gets a batch.
    assert batches == [[1, 3], [2], [0], [4]]
    # A long prompt's row never runs as long as a short prompt's many new tokens would take
    # it past the context: 90 + 100 > 150, so the two go apart.
    assert plan([10, 90], [100, 5], budget_tokens=10_000, max_rows=8, max_len=150) == [[0], [1]]
    assert plan([10, 90], [100, 5], budget_tokens=10_000, max_rows=8) == [[0, 1]]
    assert plan([5] * 10, [5] * 10, budget_tokens=10_000, max_rows=4) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]


def test_greedy_outputs_equal_plain_generate_on_the_same_padded_batches(engine: Any) -> None:
    rows = prompts(engine, 24)
    batch = engine.submit([GenRequest(prompt_token_ids=r, max_tokens=12) for r in rows])
    assert batch.wait(120)
    planned = plan([len(r) for r in rows], [12] * len(rows), 2_000, 8)
    assert len(planned) > 1, "the budget splits these prompts into several batches"
    expected: dict[int, str] = {}
    for group in planned:
        for i, tokens in zip(
            group, plain_generate(engine, [rows[i] for i in group], 12), strict=True
        ):
            expected[i] = engine._tok.decode(tokens, skip_special_tokens=True)
    got = [r.text for r in batch.results]
    assert got == [expected[i] for i in range(len(rows))]
    assert all(r.completion_tokens == 12 and r.finish_reason == "length" for r in batch.results)
    assert [r.prompt_tokens for r in batch.results] == [len(r) for r in rows]


def test_each_row_keeps_its_own_max_tokens_and_seeded_sampling_repeats(engine: Any) -> None:
    rows = prompts(engine, 6)
    reqs = [
        GenRequest(prompt_token_ids=r, max_tokens=4 + 3 * i, temperature=0.9, seed=11 + i)
        for i, r in enumerate(rows)
    ]
    first = engine.submit(reqs)
    assert first.wait(120)
    assert [r.completion_tokens for r in first.results] == [4 + 3 * i for i in range(6)]
    second = engine.submit(reqs)
    assert second.wait(120)
    assert [r.text for r in second.results] == [r.text for r in first.results]
    other = engine.submit(
        [GenRequest(prompt_token_ids=rows[5], max_tokens=19, temperature=0.9, seed=99)]
    )
    assert other.wait(60)
    assert other.results[0].text != first.results[5].text, "another seed samples otherwise"
    greedy = engine.submit([GenRequest(prompt_token_ids=rows[5], max_tokens=19)])
    assert greedy.wait(60)
    assert greedy.results[0].text != first.results[5].text, "sampling is not greedy"


def test_n_choices_and_unsupported_fields_are_named_row_errors(engine: Any) -> None:
    rows = prompts(engine, 2)
    batch = engine.submit(
        [
            GenRequest(prompt_token_ids=rows[0], max_tokens=5, n=3, temperature=0.8, seed=1),
            GenRequest(prompt_token_ids=rows[1], max_tokens=5, stop=("x",), logprobs=2),
        ]
    )
    assert batch.wait(60)
    several, refused = batch.results
    assert several.choices is not None and len(several.choices) == 3
    assert several.completion_tokens == sum(c.completion_tokens for c in several.choices)
    assert all(0 < c.completion_tokens <= 5 for c in several.choices)
    assert len({c.text for c in several.choices}) > 1, "three samples, not one copied"
    assert refused.error == "not supported by the transformers engine: stop, logprobs"


def test_classify_scores_each_label_and_matches_a_direct_forward_pass(engine: Any) -> None:
    labels = ("billing", "outage", "other")
    rows = prompts(engine, 5)
    batch = engine.submit(
        [GenRequest(prompt_token_ids=r, max_tokens=8, choices=labels) for r in rows]
    )
    assert batch.wait(120)
    tok, eos = engine._tok, engine._eos[0]
    for r, result in zip(rows, batch.results, strict=True):
        scores = []
        for label in labels:  # one unpadded sequence at a time: the direct computation
            cont = [*tok(label, add_special_tokens=False).input_ids, eos]
            with torch.inference_mode():
                logits = engine._model(input_ids=torch.tensor([r + cont])).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            scores.append(sum(logp[len(r) - 1 + k, t].item() for k, t in enumerate(cont)))
        probs = [math.exp(s - max(scores)) for s in scores]
        probs = [p / sum(probs) for p in probs]
        best = max(range(3), key=lambda j: probs[j])
        assert result.text == labels[best]
        assert result.confidence == pytest.approx(probs[best], abs=1e-4)


def test_a_causal_model_serves_every_task_and_a_classifier_only_classify() -> None:
    class Config:
        architectures = ["BertForSequenceClassification"]
        id2label = {"1": "b", "0": "a"}

    caps = capabilities_of(Config())
    assert caps.tasks == ("classify",) and caps.labels == ("a", "b") and not caps.prompted
    Config.architectures = ["LlamaForCausalLM"]
    assert "generate" in capabilities_of(Config()).tasks


def test_cancel_drops_a_batch_waiting_in_the_pool(engine: Any) -> None:
    rows = prompts(engine, 3)
    slow = engine.submit([GenRequest(prompt_token_ids=r, max_tokens=60) for r in rows])
    waiting = engine.submit([GenRequest(prompt_token_ids=r, max_tokens=60) for r in rows * 30])
    engine.cancel(waiting)
    assert slow.wait(120)
    time.sleep(0.5)  # a step of the cancelled batch already under way ends
    steps = engine.steps
    time.sleep(1.0)  # uncancelled, its 90 rows would take a dozen steps of 8 rows
    assert engine.steps == steps, "nothing of the cancelled batch runs"
    assert not waiting.done and not engine._pool


@pytest.fixture(scope="module")
def classifier() -> Any:
    from tests.support.models import tiny_bert_model

    eng = TransformersEngine(tiny_bert_model(), batch_tokens=400, max_batch_rows=8)
    yield eng
    eng.close()


def test_an_encoder_classifier_labels_and_confidences_equal_a_direct_forward_pass(
    classifier: Any,
) -> None:
    from service.store.chunks import Doc
    from workers.prompts import encode_document

    assert classifier.capabilities.labels == ("billing", "outage", "other")
    assert not classifier.capabilities.prompted
    texts = [
        "Invoice 1234 was charged twice, please refund the second payment.",
        "The API is down again and every request times out.",
        "Hello there.",
        "What is the capital of France? " * 20,
        "Please cancel my subscription at the end of the month.",
    ] * 3
    tok = classifier.tokenizer()
    rows = [encode_document(tok, Doc(i, None, t, None), 64).token_ids for i, t in enumerate(texts)]
    steps = classifier.steps
    batch = classifier.submit([GenRequest(prompt_token_ids=r, max_tokens=1) for r in rows])
    assert batch.wait(60)
    assert classifier.steps - steps > 1, "the token budget splits these into batches"
    seen = set()
    for r, result in zip(rows, batch.results, strict=True):
        with torch.inference_mode():
            logits = classifier._model(input_ids=torch.tensor([r])).logits[0]
        probs = torch.softmax(logits.float(), dim=-1)
        best = int(torch.argmax(probs))
        assert result.text == ("billing", "outage", "other")[best]
        assert result.confidence == pytest.approx(float(probs[best]), abs=1e-5)
        assert result.error is None and result.prompt_tokens == len(r)
        seen.add(result.text)
    assert len(seen) > 1, "the tiny classifier tells these texts apart"


def test_a_classifier_refuses_labels_it_does_not_have(classifier: Any) -> None:
    ids = classifier.tokenizer()("some text").input_ids
    batch = classifier.submit(
        [GenRequest(prompt_token_ids=ids, max_tokens=1, choices=("spam", "billing"))]
    )
    assert batch.wait(30)
    assert batch.results[0].error == (
        "labels ['spam'] are not this classifier's: ['billing', 'outage', 'other']"
    )


def test_a_tiny_top_p_keeps_only_the_likeliest_token_beside_greedy_rows(engine: Any) -> None:
    rows = prompts(engine, 4)
    greedy = engine.submit([GenRequest(prompt_token_ids=r, max_tokens=10) for r in rows])
    assert greedy.wait(60)
    mixed = engine.submit(
        [
            GenRequest(prompt_token_ids=r, max_tokens=10, temperature=1.5, top_p=1e-6)
            if i % 2
            else GenRequest(prompt_token_ids=r, max_tokens=10)
            for i, r in enumerate(rows)
        ]
    )
    assert mixed.wait(60)
    # The nucleus of mass 1e-6 is the likeliest token alone: sampling it is greedy decoding.
    assert [r.text for r in mixed.results] == [r.text for r in greedy.results]


def test_an_engine_that_breaks_fails_the_batch_in_flight_and_refuses_more() -> None:
    from service.errors import EngineDeadError
    from tests.support.models import tiny_model

    eng = TransformersEngine(tiny_model())
    try:

        def broken(**kwargs: Any) -> Any:
            raise RuntimeError("CUDA out of memory (simulated)")

        setattr(eng._model, "generate", broken)  # noqa: B010  (an instance attribute)
        ids = eng.tokenizer()("hello there").input_ids
        batch = eng.submit([GenRequest(prompt_token_ids=ids, max_tokens=4)])
        assert batch.wait(30), "the batch under way fails, it does not hang"
        assert isinstance(batch.failure, EngineDeadError)
        assert "CUDA out of memory (simulated)" in str(batch.failure)
        assert not eng.alive
        later = eng.submit([GenRequest(prompt_token_ids=ids, max_tokens=4)])
        assert later.done and isinstance(later.failure, EngineDeadError)
    finally:
        eng.close()
