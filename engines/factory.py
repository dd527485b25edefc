"""Pick and build the engine for a profile model."""

from __future__ import annotations

from collections.abc import Mapping

from mlx_serve.engines.base import Engine
from mlx_serve.engines.kind import engine_kind
from mlx_serve.profiles.schema import ModelSpec


def create_engine(model_id: str, spec: ModelSpec, models: Mapping[str, ModelSpec]) -> Engine:
    """Build (not load) the engine; `models` lets a speculative draft model be found by id."""
    draft_id = spec.speculative.draft_model if spec.speculative else None
    draft = (draft_id, models[draft_id]) if draft_id else None
    if engine_kind(spec) == "llama_cpp":
        from mlx_serve.engines.llamacpp.engine import LlamaCppEngine

        return LlamaCppEngine(model_id, spec)
    from mlx_serve.engines.mlx.engine import MLXEngine

    return MLXEngine(model_id, spec, draft=draft)
