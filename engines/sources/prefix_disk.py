"""Where a model's persisted prefix-cache entries live (`prefix_cache.persist`), for both engines.

One folder per model identity under ~/.mlx-serve/cache/kv/: a hash of the model id, the settings
that shape its weights and KV cache, and its weight files' names, sizes and times, so a different
model or a changed file never reads another's KV.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from mlx_serve.engines.sources.paths import cache_dir
from mlx_serve.profiles.schema import ModelSpec


def replace_folder(folder: Path, write: Callable[[Path], int]) -> int:
    """Run `write(tmp)` to fill a fresh temporary folder, then swap it in for `folder`, so a crash
    mid-save leaves the previous entries, not a torn set. Returns what `write` returns."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return written


def store_dir(model_id: str, spec: ModelSpec, weight_files: list[Path]) -> Path:
    settings = spec.model_dump(mode="json", include=set(spec.LOAD_FIELDS) - {"prefix_cache"})
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files if p.is_file())
    key = json.dumps({"model": model_id, "settings": settings, "files": files}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir("kv", f"{re.sub(r'[^A-Za-z0-9._-]', '_', model_id)[:64]}-{digest}")
