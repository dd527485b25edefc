"""Pick and build the engine for a profile model."""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping

from mlx_serve.engines.base import Engine
from mlx_serve.profiles.schema import ModelSpec


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def engine_kind(spec: ModelSpec) -> str:
    """'mlx' or 'llama_cpp'. auto: MLX on Apple Silicon; elsewhere llama.cpp for GGUF sources."""
    if spec.engine != "auto":
        return spec.engine
    if spec.is_gguf and not is_apple_silicon():
        return "llama_cpp"
    return "mlx"


def create_engine(model_id: str, spec: ModelSpec, models: Mapping[str, ModelSpec]) -> Engine:
    """Build (not load) the engine; `models` lets a speculative draft model be found by id."""
    draft_id = spec.speculative.draft_model if spec.speculative else None
    draft = (draft_id, models[draft_id]) if draft_id else None
    if engine_kind(spec) == "llama_cpp":
        from mlx_serve.engines.llamacpp.engine import LlamaCppEngine

        return LlamaCppEngine(model_id, spec)
    from mlx_serve.engines.mlx.engine import MLXEngine

    return MLXEngine(model_id, spec, draft=draft)
