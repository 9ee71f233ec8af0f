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
    raise ValueError(f"unknown engine {kind!r}; expected vllm or bench")


__all__ = ["Batch", "Engine", "GenRequest", "GenResult", "build_engine"]
