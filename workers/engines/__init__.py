"""Engines turn token-id prompts into completions. One instance per worker process, kept warm."""

from __future__ import annotations

from typing import Any

from service.errors import ConfigError
from workers.engines.base import Batch, Engine, GenRequest, GenResult


def build_engine(kind: str, model: str, **options: object) -> Engine:
    """Builds the engine named by ``kind`` (settings.engine.kind). Call once, at worker start."""
    if kind == "vllm":
        from workers.engines.vllm_engine import VllmEngine

        refuse_classifier(model)

        return VllmEngine(model, **options)  # type: ignore[arg-type]
    if kind == "transformers":
        from service.settings import get_settings
        from workers.engines.transformers_engine import TransformersEngine

        s = get_settings().engine
        return TransformersEngine(
            model,
            max_model_len=options.get("max_model_len"),  # type: ignore[arg-type]
            dtype=str(options.get("dtype") or "auto"),
            batch_tokens=s.transformers_batch_tokens,
            max_batch_rows=s.transformers_max_batch_rows,
        )
    if kind == "bench":
        from workers.engines.bench import BenchEngine

        return BenchEngine(model)
    if kind == "sim":
        from service.settings import get_settings
        from workers.engines.sim import SimEngine, SimParams

        s = get_settings().engine
        params = SimParams(
            s.sim_step_ms, s.sim_step_ms_per_seq, s.sim_max_num_seqs, s.sim_prefill_tokens_per_ms
        )
        return SimEngine(model, params, max_model_len=s.max_model_len or 32_768)
    raise ValueError(f"unknown engine {kind!r}; expected vllm, transformers, bench or sim")


def model_config(model: str) -> Any:
    """The model's ``config.json`` through transformers (a local path, or the local cache:
    nothing is downloaded here); None where it cannot be read."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model)
    except Exception:
        return None


def refuse_classifier(model: str) -> None:
    """vLLM would serve a ``*ForSequenceClassification`` model as a pooling model, not through
    the generate path every docqueue task takes: refuse to start, saying what will serve it."""
    from workers.engines.transformers_engine import is_classifier

    config = model_config(model)
    if config is not None and is_classifier(config):
        archs = ", ".join(config.architectures)
        raise ConfigError(
            f"{model} is a sequence classifier ({archs}): the vllm engine does not serve it; "
            "use --engine transformers (DOCQUEUE_ENGINE=transformers)"
        )


__all__ = ["Batch", "Engine", "GenRequest", "GenResult", "build_engine"]
