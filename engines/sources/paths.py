"""Where mlx-serve keeps its own files (profile, logs, caches). MLX_SERVE_HOME overrides ~/.mlx-serve."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("MLX_SERVE_HOME", "~/.mlx-serve")).expanduser()


def cache_dir(*parts: str) -> Path:
    return home().joinpath("cache", *parts)
