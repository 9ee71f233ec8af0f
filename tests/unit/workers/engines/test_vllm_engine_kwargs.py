"""The engine arguments a worker runs with: compiled unless eager is asked for (vLLM's own
default, which issue 14's users compare against), and on CPU hosts without vLLM's AOT compile
cache, which never loads there and would recompile at every start."""

from __future__ import annotations

import os

import pytest

from tests.support.models import tiny_model
from workers.engines.vllm_engine import engine_kwargs


@pytest.fixture
def no_aot_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """VLLM_USE_AOT_COMPILE unset for the test and as it was after it."""
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "unset-by-test")
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE")


@pytest.mark.usefixtures("no_aot_setting")
def test_cpu_default_is_compiled_without_the_aot_cache() -> None:
    kwargs = engine_kwargs(tiny_model(), device="cpu")
    assert kwargs["enforce_eager"] is False
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"


@pytest.mark.usefixtures("no_aot_setting")
def test_eager_when_asked_leaves_compilation_settings_alone() -> None:
    kwargs = engine_kwargs(tiny_model(), device="cpu", enforce_eager=True)
    assert kwargs["enforce_eager"] is True
    assert "VLLM_USE_AOT_COMPILE" not in os.environ


def test_an_operators_aot_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    assert engine_kwargs(tiny_model(), device="cpu")["enforce_eager"] is False
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"
