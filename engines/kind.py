"""Which engine a profile model runs on. Its own module (not factory.py) so that model sources and
the daemon can ask without importing the engines: factory imports both engines, which import
sources, which needs this."""

from __future__ import annotations

import platform
import sys

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
