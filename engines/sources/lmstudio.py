"""LM Studio's model folder: models a user already downloaded with LM Studio, usable without a copy.

LM Studio keeps models as <root>/<publisher>/<model>/<files>: GGUF files (one or more quants, maybe
split), or an MLX folder (config.json + *.safetensors). Roots, first match wins:
$MLX_SERVE_LMSTUDIO_MODELS (os.pathsep-separated; replaces the defaults), else ~/.lmstudio/models
and the older ~/.cache/lm-studio/models.

In a profile: `source = "lmstudio:PUBLISHER/MODEL"` (an MLX folder, or a GGUF folder where
`gguf_quant` picks the quant as for a Hugging Face repo: default Q4_K_M when there are several) or
`source = "lmstudio:PUBLISHER/MODEL/FILE.gguf"`. For a GGUF folder on llama.cpp set `gguf_quant`:
it is also what tells the profile the model is GGUF (`engine = "llama_cpp"` requires that). An absolute path into the folder works too (it is a
plain local source). `mlx-serve models --discover` lists what is there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.sources.repo_files import gguf_groups, select_gguf

ENV_ROOTS = "MLX_SERVE_LMSTUDIO_MODELS"


def roots() -> list[Path]:
    if value := os.environ.get(ENV_ROOTS):
        return [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    return [Path("~/.lmstudio/models").expanduser(), Path("~/.cache/lm-studio/models").expanduser()]


@dataclass(frozen=True)
class LMStudioModel:
    ref: str  # PUBLISHER/MODEL, what goes after `lmstudio:`
    path: Path
    format: str  # "mlx" or "gguf"
    size: int
    quants: tuple[str, ...]  # GGUF quants present (empty for MLX)

    @property
    def source(self) -> str:
        return f"lmstudio:{self.ref}"


def _is_mlx(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _ggufs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.gguf") if p.is_file())


def discover() -> list[LMStudioModel]:
    """Every model folder under the roots (a ref seen in an earlier root hides later ones)."""
    found: dict[str, LMStudioModel] = {}
    for root in roots():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.glob("*/*") if p.is_dir()):
            ref = f"{folder.parent.name}/{folder.name}"
            if ref in found or ref.startswith("."):
                continue
            ggufs = _ggufs(folder)
            if _is_mlx(folder):
                size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
                found[ref] = LMStudioModel(ref, folder, "mlx", size, ())
            elif ggufs:
                size = sum((folder / name).stat().st_size for name in ggufs)
                quants = tuple(sorted({g.label for g in gguf_groups(ggufs)}))
                found[ref] = LMStudioModel(ref, folder, "gguf", size, quants)
    return list(found.values())


def resolve_lmstudio(model_id: str, ref: str, gguf_quant: str | None) -> Path:
    """The folder (MLX) or .gguf file (first part) for `lmstudio:REF`."""
    parts = [p for p in ref.strip().split("/") if p]
    if len(parts) < 2 or ".." in parts:
        raise ModelLoadError(model_id, f"source 'lmstudio:{ref}' must look like 'lmstudio:PUBLISHER/MODEL'")
    searched = roots()
    for root in searched:
        path = root.joinpath(*parts)
        if path.is_file():
            return path
        if not path.is_dir():
            continue
        if _is_mlx(path):
            return path
        where = f"LM Studio folder {'/'.join(parts)!r}"
        return path / select_gguf(model_id, _ggufs(path), gguf_quant, where)[0]
    shown = ", ".join(str(r) for r in searched)
    raise ModelLoadError(
        model_id,
        f"LM Studio model {'/'.join(parts)!r} not found in {shown} (`mlx-serve models --discover` lists them)",
    )
