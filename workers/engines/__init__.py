"""Engines turn token-id prompts into completions. One instance per worker process, kept warm."""

from __future__ import annotations

from typing import Any

from service.errors import ConfigError
from service.settings import Settings
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


def engine_for(settings: Settings, model: str) -> Engine:
    """The engine ``settings.engine`` configures, for ``model`` (a worker's, or ``docqueue
    run``'s)."""
    e = settings.engine
    return build_engine(
        e.kind,
        model,
        max_model_len=e.max_model_len,
        gpu_memory_utilization=e.gpu_memory_utilization,
        kv_cache_gib=e.kv_cache_gib,
        max_num_seqs=e.max_num_seqs,
        dtype=e.dtype,
        enforce_eager=e.enforce_eager,
        tensor_parallel_size=e.tensor_parallel_size,
    )


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


__all__ = ["Batch", "Engine", "GenRequest", "GenResult", "build_engine", "engine_for"]
