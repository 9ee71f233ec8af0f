"""The engine batch: results one by one as requests finish, or all at once."""

from __future__ import annotations

import pytest

from workers.engines.base import Batch, GenResult


def test_fill_completes_a_batch_at_once() -> None:
    batch = Batch(3)
    assert not batch.done and batch.progressed_at is None
    batch.fill([GenResult(text=t) for t in ("a", "b", "c")])
    assert batch.done and batch.wait(0) and batch.progressed_at is not None
    assert [r.text for r in batch.results if r is not None] == ["a", "b", "c"]
    batch.set(0, GenResult(text="late"))  # a late duplicate changes nothing
    assert batch.results[0] is not None and batch.results[0].text == "a"


@pytest.mark.parametrize("given", [2, 4])
def test_fill_needs_one_result_per_request(given: int) -> None:
    batch = Batch(3)
    with pytest.raises(ValueError, match="one result per request"):
        batch.fill([GenResult()] * given)
    assert not batch.done


def test_fill_refuses_a_batch_already_partly_answered() -> None:
    batch = Batch(2)
    batch.set(1, GenResult(text="b"))
    with pytest.raises(ValueError):
        batch.fill([GenResult(), GenResult()])
    batch.set(0, GenResult(text="a"))
    assert batch.done
