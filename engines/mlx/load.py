"""Loading an mlx-lm model, its draft model and its chat template, and checking the profile's
settings against them.

Every failure becomes a ModelLoadError naming the model and the reason, so a bad profile entry or
broken model files fail the load with a message the user can act on. Runs on the engine thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_reduce

from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.sources.resolve import mlx_model_dir
from mlx_serve.engines.text.prompting import ChatTemplate, TemplateError, check_template
from mlx_serve.profiles.schema import ModelSpec

log = logging.getLogger("mlx_serve.engines.mlx")


def load_mlx(model_id: str, path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """mlx_lm.load with its failures turned into ModelLoadError naming the model and the reason."""
    try:
        model, tokenizer, config = mlx_lm.load(str(path), return_config=True)
        # Building the model drew its (discarded) random initial weights from MLX's global key,
        # leaving that key a lazy chain of a split per layer that nothing evaluates: it would hold
        # native memory past the unload and grow with every load. Evaluating it cuts the chain.
        mx.eval(mx.random.state)
    except FileNotFoundError as exc:
        raise ModelLoadError(model_id, f"missing model files: {exc}") from None
    except ValueError as exc:
        text = str(exc)
        kind = "unsupported architecture" if "not supported" in text else "weights do not match the config"
        raise ModelLoadError(model_id, f"{kind}: {text}") from None
    except Exception as exc:  # corrupt safetensors, bad JSON, tokenizer errors, ...
        raise ModelLoadError(model_id, f"corrupt or unreadable model files: {exc}") from None
    return model, tokenizer, config


def weights_nbytes(model: Any) -> int:
    return int(tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, model, 0))


def check_kv_settings(model_id: str, spec: ModelSpec) -> None:
    kv = spec.kv_cache
    if kv is not None and kv.bits is not None and kv.max_size is not None:
        raise ModelLoadError(
            model_id,
            "kv_cache.bits together with kv_cache.max_size is not supported on MLX "
            "(mlx-lm cannot quantize a rotating KV cache); drop one of them",
        )
    if kv is not None and kv.max_size is not None and spec.speculative is not None:
        if spec.speculative.draft_model is not None:
            log.warning(
                "%s: kv_cache.max_size does not apply with a draft model (speculative decoding "
                "needs a trimmable cache); the KV cache grows to the context length",
                model_id,
            )


def check_kv_group(model_id: str, spec: ModelSpec, config: dict[str, Any]) -> None:
    kv = spec.kv_cache
    if kv is None or kv.bits is None:
        return
    heads = config.get("num_attention_heads") or 0
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else 0)
    if isinstance(head_dim, int) and head_dim and head_dim % kv.group_size:
        raise ModelLoadError(
            model_id,
            f"kv_cache.group_size {kv.group_size} does not divide the model's head size {head_dim}",
        )


def load_draft(model_id: str, draft: tuple[str, ModelSpec] | None, config: dict[str, Any]) -> Any:
    """The draft model for `model_id` (whose config is `config`); it must share the vocabulary."""
    if draft is None:
        raise ModelLoadError(model_id, "speculative.draft_model is set but no draft model was given")
    draft_id, draft_spec = draft
    try:
        draft_model, _, draft_config = load_mlx(draft_id, mlx_model_dir(draft_id, draft_spec))
    except ModelLoadError as exc:
        raise ModelLoadError(model_id, f"draft model {draft_id!r}: {exc.reason}") from None
    if draft_config.get("vocab_size") != config.get("vocab_size"):
        raise ModelLoadError(
            model_id,
            f"draft model {draft_id!r} has a different vocabulary "
            f"({draft_config.get('vocab_size')} vs {config.get('vocab_size')} tokens)",
        )
    return draft_model


def select_chat_template(model_id: str, spec: ModelSpec, tokenizer: Any) -> ChatTemplate | None:
    """The profile's chat_template (inline or a file name), else the tokenizer's; None if neither."""
    source = spec.chat_template
    if source is not None and "{{" not in source and "{%" not in source:
        path = Path(source).expanduser()  # a file name rather than the template itself
        if not path.is_file():
            raise ModelLoadError(model_id, f"chat_template file {source!r} does not exist")
        source = path.read_text(encoding="utf-8")
    if source is None:
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # named templates: the default one
            source = source.get("default") or next(iter(source.values()), None)
    if not source:
        return None
    template = ChatTemplate(source, tokenizer.bos_token or "", tokenizer.eos_token or "")
    try:
        check_template(template)
    except TemplateError as exc:
        raise ModelLoadError(model_id, str(exc)) from None
    return template
