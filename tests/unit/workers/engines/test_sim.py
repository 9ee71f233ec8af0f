"""The simulated GPU engine: continuous batching bounded by ``max_num_seqs``, rows returned as
they finish, cancel, and output lengths that depend on the prompt only. Steps are 1-2 ms, so
the orderings asserted differ by a hundred steps or more."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from service.errors import EngineDeadError
from service.settings import get_settings
from tests.support import ROOT
from workers.engines import build_engine
from workers.engines.base import Batch, GenRequest
from workers.engines.sim import SimEngine, SimParams, StableTokenizer, output_tokens

MAX_TOKENS = 128
#: Single-token prompts whose simulated output is long (runs to MAX_TOKENS) or short (<= 12).
LONG = [k for k in range(400) if output_tokens([k], MAX_TOKENS) == MAX_TOKENS]
SHORT = [k for k in range(400) if output_tokens([k], MAX_TOKENS) <= 12]


def req(token: int, max_tokens: int = MAX_TOKENS, **kw: object) -> GenRequest:
    return GenRequest(prompt_token_ids=[token], max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


@pytest.fixture
def engine() -> Iterator[SimEngine]:
    e = SimEngine("sim-test", SimParams(step_ms=1.0, step_ms_per_seq=0.0, max_num_seqs=4))
    yield e
    e.close()


def wait_until(cond: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_lengths_depend_on_the_prompt_only_and_vary() -> None:
    tok = StableTokenizer()
    ids = tok("the same document twice").input_ids
    assert output_tokens(ids, MAX_TOKENS) == output_tokens(list(ids), MAX_TOKENS)
    lengths = [output_tokens([k, 7], MAX_TOKENS) for k in range(2000)]
    assert min(lengths) == 5 and max(lengths) == MAX_TOKENS
    assert 0.1 < sum(n <= 12 for n in lengths) / 2000 < 0.2  # some stop almost at once
    assert 0.1 < sum(n == MAX_TOKENS for n in lengths) / 2000 < 0.25  # some run to the end
    assert all(output_tokens([k], 16) <= 16 for k in range(200))


def test_token_ids_are_the_same_in_every_process() -> None:
    """Lengths come from token ids, so a worker must tokenize as the benchmark's process."""
    code = "from workers.engines import sim; print(sim.StableTokenizer()('a b c').input_ids)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == str(StableTokenizer()("a b c").input_ids)


def test_results_are_deterministic_and_sized_by_their_length(engine: SimEngine) -> None:
    prompts = [req(k) for k in range(12)]
    first, second = engine.submit(prompts), engine.submit(prompts)
    assert first.wait(10) and second.wait(10)
    for k, (a, b) in enumerate(zip(first.results, second.results, strict=True)):
        assert a is not None and b is not None
        n = output_tokens([k], MAX_TOKENS)
        assert a.completion_tokens == b.completion_tokens == n
        assert a.text == b.text and len(a.text.split()) == n
        assert a.finish_reason == ("length" if n == MAX_TOKENS else "stop")
        assert a.prompt_tokens == 1


def test_running_sequences_never_exceed_max_num_seqs(engine: SimEngine) -> None:
    batch = engine.submit([req(k) for k in range(20)])
    assert batch.wait(20)
    assert engine.peak_running == 4
    assert all(r is not None and r.error is None for r in batch.results)


def test_a_finished_row_frees_its_slot_for_waiting_work_at_once() -> None:
    """Continuous batching: with two slots, a long and a short row running, a third request
    takes the short row's slot and finishes long before the long row does."""
    e = SimEngine("sim-test", SimParams(step_ms=2.0, step_ms_per_seq=0.0, max_num_seqs=2))
    try:
        first = e.submit([req(LONG[0]), req(SHORT[0])])
        later = e.submit([req(SHORT[1])])
        assert later.wait(10)
        assert not first.done  # the long row runs 128 steps; the two short ones <= 24
        assert first.results[1] is not None and first.results[0] is None
        assert first.wait(10)
        assert e.peak_running == 2
    finally:
        e.close()


def test_rows_return_as_they_finish_not_with_their_batch(engine: SimEngine) -> None:
    batch = engine.submit([req(LONG[0]), req(SHORT[0])])
    wait_until(lambda: batch.results[1] is not None)
    assert batch.results[0] is None and not batch.done
    assert batch.progressed_at is not None  # tokens count as progress for the stall deadline
    assert batch.wait(10)


def test_cancel_drops_running_and_waiting_requests(engine: SimEngine) -> None:
    running = engine.submit([req(k) for k in LONG[:4]])  # fills the four slots
    waiting = engine.submit([req(LONG[4])])
    wait_until(lambda: running.progressed_at is not None)
    assert engine.in_flight == (1, 4)
    engine.cancel(waiting)
    engine.cancel(running)
    assert engine.in_flight == (0, 0)
    after = engine.submit([req(SHORT[0])])  # the engine goes on with other work
    assert after.wait(10)
    assert not running.done and not waiting.done
    assert running.results == [None] * 4 and waiting.results == [None]


def test_bad_requests_are_row_errors_and_close_fails_the_rest() -> None:
    e = SimEngine("sim-test", SimParams(step_ms=20.0, max_num_seqs=2), max_model_len=64)
    full = next(k for k in range(400) if output_tokens([k], 40) == 40)  # 40 steps: 800 ms
    batch = e.submit(
        [GenRequest([], 8), req(1, max_tokens=100), req(2, max_tokens=8, n=3), req(full, 40)]
    )
    wait_until(lambda: e.in_flight == (0, 1))
    assert [r is not None and r.error is not None for r in batch.results[:3]] == [True] * 3
    e.close()
    assert batch.done and isinstance(batch.failure, EngineDeadError)
    late = e.submit([req(1)])
    assert isinstance(late.failure, EngineDeadError)


def test_choices_run_in_lockstep_and_each_has_its_length(engine: SimEngine) -> None:
    batch = engine.submit([req(3, n=2, logprobs=0), req(4, choices=("yes", "no"))])
    assert batch.wait(10)
    multi, label = batch.results
    assert multi is not None and multi.choices is not None and label is not None
    lengths = [output_tokens([3], MAX_TOKENS, c) for c in range(2)]
    assert [c.completion_tokens for c in multi.choices] == lengths
    assert multi.completion_tokens == sum(lengths)
    assert multi.choices[0].logprobs is not None and len(multi.choices[0].logprobs) == lengths[0]
    assert label.text == "yes" and label.confidence == 1.0


def test_build_engine_reads_the_sim_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCQUEUE_SIM_MAX_NUM_SEQS", "3")
    monkeypatch.setenv("DOCQUEUE_SIM_STEP_MS", "1.5")
    get_settings.cache_clear()
    try:
        e = build_engine("sim", "sim-test")
    finally:
        get_settings.cache_clear()
    try:
        assert isinstance(e, SimEngine)
        assert e.params.max_num_seqs == 3 and e.params.step_ms == 1.5
        b: Batch = e.submit([req(k) for k in range(6)])
        assert b.wait(10) and e.peak_running == 3
    finally:
        e.close()


def test_busy_periods_count_steps_tokens_and_starved_steps(engine: SimEngine) -> None:
    """A benchmark reads bubbles from these: one request alone leaves three slots free every
    step (starved), and the engine going idle closes the period."""
    n = output_tokens([SHORT[0]], MAX_TOKENS)
    assert engine.submit([req(SHORT[0])]).wait(10)
    wait_until(lambda: len(engine.periods) == 1)
    period = engine.periods[0]
    assert period.steps == period.tokens == period.starved_steps == n
    assert period.ended > period.started
    full = engine.submit([req(k) for k in LONG[:4]])
    assert full.wait(10)
    wait_until(lambda: len(engine.periods) == 2)
    assert engine.periods[1].starved_steps == 0  # four slots, four rows of equal length
