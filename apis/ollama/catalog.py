"""What Ollama's model endpoints (/api/tags, /api/show, /api/ps) say about a profile model.

Facts come from the model's files on disk (GGUF header; MLX config, tokenizer and safetensors
headers) without loading it, cached by file identity; a loaded engine's own `info()` overrides
them. Sources that are not on disk yet (hub repos not downloaded) are "unknown": /api/tags shows
them with size 0 and /api/show loads the model to answer.

Nothing here reveals a file path: digests are hashes, names are profile ids and aliases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mlx_serve.engines.kind import engine_kind
from mlx_serve.engines.text.prompting import fim_tokens_from_vocab
from mlx_serve.engines.types import EngineInfo

log = logging.getLogger("mlx_serve.apis.ollama")
DEFAULT_MLX_CONTEXT = 4096


@dataclass(frozen=True)
class ModelFacts:
    known: bool  # False: the files are not local; only the profile's settings are known
    format: str  # "gguf" | "mlx"
    family: str = "unknown"
    parameter_count: int | None = None
    quantization: str | None = None
    size: int = 0
    digest: str = ""
    modified_at: float = 0.0
    context_length: int | None = None
    capabilities: frozenset[str] = frozenset()  # internal names (engines.types.Capability)
    chat_template: str | None = None
    embedding_length: int | None = None
    fim_tokens: tuple[str, str, str] | None = None  # (prefix, suffix, middle)


def tagged(name: str) -> str:
    """Ollama names carry a tag; ours get ":latest" unless they already have one."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def listed_names(model_id: str, aliases: list[str]) -> list[str]:
    """The id and every literal alias (glob aliases name no model a client could pick from a list)."""
    return [model_id] + [a for a in aliases if not any(c in a for c in "*?[")]


def parameter_size(count: int | None) -> str:
    if not count:
        return ""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}" if unit == "B" else f"{value:.2f}{unit}"
    return str(count)


def capabilities(kind: set[str] | frozenset[str]) -> list[str]:
    """Internal capability names -> Ollama's ("insert" is fill-in-the-middle)."""
    out = []
    if "completion" in kind or "chat" in kind:
        out.append("completion")
    mapping = {"tools": "tools", "fim": "insert", "embedding": "embedding", "vision": "vision"}
    out += [name for internal, name in mapping.items() if internal in kind]
    return out


def details(facts: ModelFacts) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": facts.format,
        "family": facts.family,
        "families": [facts.family],
        "parameter_size": parameter_size(facts.parameter_count),
        "quantization_level": facts.quantization or "",
    }


def with_engine(facts: ModelFacts, info: EngineInfo) -> ModelFacts:
    """A loaded engine knows best: its context, capabilities and template replace the file facts."""
    return dataclasses.replace(
        facts,
        known=True,
        family=info.architecture if info.architecture != "unknown" else facts.family,
        parameter_count=info.parameter_count or facts.parameter_count,
        quantization=(info.quantization or "").removeprefix("ALL_") or facts.quantization,
        context_length=info.context_length,
        capabilities=frozenset(info.capabilities),
        chat_template=info.chat_template,
        embedding_length=info.embedding_length or facts.embedding_length,
        fim_tokens=info.fim_tokens,
    )


# ---- facts from files ------------------------------------------------------------------------


def static_facts(model_id: str, spec: Any) -> ModelFacts:
    """Facts from the files on disk; never loads, never downloads."""
    from mlx_serve.engines.sources.resolve import is_local_source, resolve_source

    fmt = "gguf" if spec.is_gguf else "mlx"
    if not (spec.source.startswith("package:") or is_local_source(spec.source)):
        return ModelFacts(known=False, format=fmt)
    try:
        path = resolve_source(model_id, spec)
        files = [path] if path.is_file() else sorted([*path.glob("*.gguf"), *path.glob("*.safetensors")])
        stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        facts = _file_facts(str(path), stats, spec.source, spec.embedding, spec.chat_template)
    except Exception as exc:  # a missing or unreadable file: the model will fail to load with the reason
        log.debug("cannot read facts for %s: %s", model_id, exc)
        return ModelFacts(known=False, format=fmt)
    if spec.context_length:
        facts = dataclasses.replace(facts, context_length=spec.context_length)
    elif engine_kind(spec) == "llama_cpp" and facts.context_length:
        from mlx_serve.engines.llamacpp.load import DEFAULT_MAX_CONTEXT

        facts = dataclasses.replace(facts, context_length=min(facts.context_length, DEFAULT_MAX_CONTEXT))
    return facts


@lru_cache(maxsize=64)
def _file_facts(
    path: str, stats: tuple[tuple[str, int, int], ...], source: str, embedding: bool, template: str | None
) -> ModelFacts:
    size = sum(s for _, s, _ in stats)
    modified = max((m for _, _, m in stats), default=0) / 1e9
    digest = hashlib.sha256(f"{source}\0{size}".encode()).hexdigest()
    base = ModelFacts(known=True, format="mlx", size=size, digest=digest, modified_at=modified)
    p = Path(path)
    gguf = (
        p
        if p.suffix.lower() == ".gguf"
        else next((Path(f) for f, _, _ in stats if f.endswith(".gguf")), None)
    )
    facts = _gguf_facts(base, gguf) if gguf else _mlx_facts(base, p)
    chat_template = (template if template and ("{{" in template or "{%" in template) else None) or (
        facts.chat_template
    )
    caps = {"embedding"} if embedding else {"completion"} | ({"chat", "tools"} if chat_template else set())
    if not embedding and facts.fim_tokens:
        caps.add("fim")
    return dataclasses.replace(facts, capabilities=frozenset(caps), chat_template=chat_template)


def _gguf_facts(base: ModelFacts, path: Path) -> ModelFacts:
    from mlx_serve.engines.llamacpp.load import read_gguf_header

    header = read_gguf_header(path)
    trained = header.arch_value("context_length")
    return dataclasses.replace(
        base,
        format="gguf",
        family=header.architecture,
        parameter_count=header.parameter_count,
        quantization=header.quantization.removeprefix("ALL_") if header.quantization else None,
        context_length=trained if isinstance(trained, int) and trained > 0 else None,
        fim_tokens=fim_tokens_from_vocab(header.tokens),
        chat_template=header.metadata.get("tokenizer.chat_template"),
        embedding_length=header.arch_value("embedding_length"),
    )


def _mlx_facts(base: ModelFacts, folder: Path) -> ModelFacts:
    config = _read_json(folder / "config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    quant = config.get("quantization")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    params, dtype = _safetensors_stats(sorted(folder.glob("*.safetensors")), bits)
    context = config.get("max_position_embeddings") or tok_config.get("model_max_length")
    return dataclasses.replace(
        base,
        family=str(config.get("model_type", "unknown")),
        parameter_count=params or None,
        quantization=f"{bits}bit" if bits else dtype,
        context_length=context if isinstance(context, int) and 0 < context < 10**7 else DEFAULT_MLX_CONTEXT,
        fim_tokens=fim_tokens_from_vocab(_vocab(folder)),
        chat_template=template if isinstance(template, str) else None,
        embedding_length=config.get("hidden_size"),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _vocab(folder: Path) -> list[str]:
    tok = _read_json(folder / "tokenizer.json")
    vocab = list((tok.get("model") or {}).get("vocab") or {})
    return vocab + [t.get("content", "") for t in tok.get("added_tokens") or [] if isinstance(t, dict)]


def _safetensors_stats(files: list[Path], bits: int | None) -> tuple[int, str | None]:
    """(parameter count, dtype) from safetensors headers; packed quantized weights are unpacked."""
    params, dtype = 0, None
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(n, 100 << 20)))
        for name, t in header.items():
            if name == "__metadata__" or name.endswith((".scales", ".biases")):
                continue
            count = 1
            for d in t.get("shape", []):
                count *= d
            if bits and t.get("dtype") == "U32":
                count = count * 32 // bits
            elif dtype is None:
                dtype = t.get("dtype")
            params += count
    return params, dtype


# ---- /api/show -------------------------------------------------------------------------------


def go_template(facts: ModelFacts) -> str:
    """An Ollama-style (Go) template. Clients read it, never run it: Continue, for one, enables
    fill-in-the-middle only when it contains `.Suffix`. Chat prompts use the model's own Jinja
    template, which is shown after the FIM block (or alone) for reference."""
    chat = facts.chat_template or "{{ .Prompt }}"
    if not facts.fim_tokens or "fim" not in facts.capabilities:
        return chat
    pre, suf, mid = facts.fim_tokens
    return f"{{{{- if .Suffix }}}}{pre}{{{{ .Prompt }}}}{suf}{{{{ .Suffix }}}}{mid}{{{{- else }}}}{chat}{{{{- end }}}}"


def parameters_text(spec: Any, facts: ModelFacts) -> str:
    """Modelfile-style `PARAMETER` lines (name, spaces, value), as clients parse them."""
    lines = []
    if facts.context_length:
        lines.append(("num_ctx", str(facts.context_length)))
    sampling = spec.sampling
    for wire, ours in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("repeat_penalty", "repetition_penalty"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
        ("num_predict", "max_tokens"),
    ):
        value = getattr(sampling, ours)
        if value is not None:
            lines.append((wire, str(value)))
    return "\n".join(f"{name:<30} {value}" for name, value in lines)


def model_info(facts: ModelFacts) -> dict[str, Any]:
    arch = facts.family
    info: dict[str, Any] = {"general.architecture": arch}
    if facts.parameter_count:
        info["general.parameter_count"] = facts.parameter_count
    if facts.context_length:
        info[f"{arch}.context_length"] = facts.context_length
    if facts.embedding_length:
        info[f"{arch}.embedding_length"] = facts.embedding_length
    return info


def show_body(model_id: str, spec: Any, facts: ModelFacts, modified_at: str) -> dict[str, Any]:
    params = parameters_text(spec, facts)
    template = go_template(facts)
    modelfile = [f"# Modelfile generated by mlx-serve for profile model {model_id!r}", f"FROM {model_id}"]
    modelfile += [f"PARAMETER {line}" for line in params.splitlines()]
    modelfile.append(f'TEMPLATE """{template}"""')
    return {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": params,
        "template": template,
        "license": "",
        "details": details(facts),
        "model_info": model_info(facts),
        "capabilities": capabilities(facts.capabilities),
        "modified_at": modified_at,
    }
