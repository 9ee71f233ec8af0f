"""Engines turn token-id prompts into completions. One instance per worker process, kept warm."""

from __future__ import annotations

from workers.engines.base import Batch, Engine, GenRequest, GenResult


def build_engine(kind: str, model: str, **options: object) -> Engine:
    """Builds the engine named by ``kind`` (settings.engine.kind). Call once, at worker start."""
    if kind == "vllm":
        from workers.engines.vllm_engine import VllmEngine

        return VllmEngine(model, **options)  # type: ignore[arg-type]
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
    raise ValueError(f"unknown engine {kind!r}; expected vllm, bench or sim")


__all__ = ["Batch", "Engine", "GenRequest", "GenResult", "build_engine"]
