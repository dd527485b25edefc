"""Which files a model needs from a repo or folder listing (pure functions, no I/O).

MLX / safetensors repos: the top-level files mlx-lm reads. GGUF repos and folders: one quant, chosen by
`gguf_quant` (case-insensitive: the exact quant label, else a file name containing it), else the only
one, else Q4_K_M; a split file (`-00001-of-0000N.gguf`) brings all its parts. A missing or ambiguous
choice is a ModelLoadError that lists what is available.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.profiles.schema import ModelSpec

# mlx-lm's DEFAULT_ALLOW_PATTERNS minus *.py (remote code is never run); top-level files only.
MLX_PATTERNS = (
    "*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja",
)  # fmt: skip
DEFAULT_QUANT = "Q4_K_M"
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".safetensors")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d+(?:_[A-Za-z0-9]+)*|BF16|FP16|FP32|F16|F32)(?![A-Za-z0-9])", re.I)


@dataclass(frozen=True)
class GGUFGroup:
    label: str  # the quant (Q4_K_M, Q8_0, F16, ...), or the file name when none is recognisable
    files: tuple[str, ...]  # every part in order; files[0] is the one llama.cpp opens
    parts: int  # parts the file name declares (1 when not split)


def parse_hub_source(model_id: str, source: str) -> tuple[str, str | None]:
    """'org/name' -> (repo, None); 'org/name/path/FILE.gguf' -> (repo, 'path/FILE.gguf')."""
    parts = source.strip().strip("/").split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if len(parts) < 2 or not _REPO_ID.match(repo):
        raise ModelLoadError(
            model_id,
            f"source {source!r} is neither an existing local path nor a Hugging Face repo id like 'org/name'",
        )
    if filename and not filename.lower().endswith(".gguf"):
        raise ModelLoadError(model_id, f"source {source!r}: a file inside a repo must be a .gguf file")
    return repo, filename


def quant_label(name: str) -> str | None:
    stem = _SPLIT.sub("", name.rsplit("/", 1)[-1])
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


def gguf_groups(names: list[str]) -> list[GGUFGroup]:
    groups: dict[str, list[str]] = {}
    declared: dict[str, int] = {}
    for name in sorted(names):
        base = name.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base:  # vision projectors are not models
            continue
        split = _SPLIT.search(name)
        key = name[: split.start()] if split else name[:-5]
        groups.setdefault(key, []).append(name)
        if split:
            declared[key] = int(split.group(2))
    return [
        GGUFGroup(quant_label(key + ".gguf") or key.rsplit("/", 1)[-1], tuple(files), declared.get(key, 1))
        for key, files in groups.items()
    ]


def select_gguf(model_id: str, names: list[str], want: str | None, where: str) -> list[str]:
    """The files of one quant: `want` (case-insensitive; exact label, else a name containing it), else
    the only one, else Q4_K_M. A missing or ambiguous choice is an error listing what is there."""
    groups = gguf_groups(names)
    if not groups:
        raise ModelLoadError(model_id, f"{where} has no .gguf files")
    available = ", ".join(sorted({g.label for g in groups}))
    if want:
        wanted = want.strip().upper().removesuffix(".GGUF")
        chosen = [g for g in groups if g.label.upper() == wanted]
        chosen = chosen or [g for g in groups if wanted in g.files[0].rsplit("/", 1)[-1].upper()]
        if not chosen:
            raise ModelLoadError(model_id, f"{where} has no {want} GGUF; available quants: {available}")
    elif len(groups) == 1:
        chosen = groups
    else:
        chosen = [g for g in groups if g.label == DEFAULT_QUANT]
        if not chosen:
            raise ModelLoadError(
                model_id,
                f"{where} has several GGUF quants and no {DEFAULT_QUANT}; set gguf_quant to one of: {available}",
            )
    if len(chosen) > 1:
        names_found = ", ".join(g.files[0] for g in chosen)
        raise ModelLoadError(
            model_id,
            f"{where}: {want or DEFAULT_QUANT} matches several files ({names_found}); name one in source",
        )
    group = chosen[0]
    if len(group.files) != group.parts:
        raise ModelLoadError(
            model_id,
            f"{where}: split GGUF {group.files[0]} has {len(group.files)} of its {group.parts} parts",
        )
    return list(group.files)


def plan_files(
    model_id: str, spec: ModelSpec, filename: str | None, listing: dict[str, int | None], where: str
) -> tuple[list[str], str]:
    """(files to have, entry) for a repo listing; entry '' means the snapshot folder itself."""
    names = list(listing)
    if filename:
        group = next((g for g in gguf_groups(names) if filename in g.files), None)
        if group is None:
            raise ModelLoadError(model_id, f"{where} has no file {filename!r}")
        return select_gguf(model_id, list(group.files), None, where), group.files[0]
    weights = [n for n in names if "/" not in n and fnmatch.fnmatch(n, "model*.safetensors")]
    if spec.gguf_quant or (not weights and gguf_groups(names)):
        files = select_gguf(model_id, names, spec.gguf_quant, where)
        return files, files[0]
    if not weights:
        found = sorted({Path(n).suffix for n in names if Path(n).suffix in _OTHER_WEIGHTS})
        extra = f"; it has only {', '.join(found)} weights, which mlx-lm cannot load" if found else ""
        raise ModelLoadError(
            model_id, f"{where} has no usable weights (model*.safetensors for MLX, or .gguf files){extra}"
        )
    if "config.json" not in names:
        raise ModelLoadError(model_id, f"{where} has safetensors weights but no config.json")
    files = [n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in MLX_PATTERNS)]
    return sorted(files), ""
