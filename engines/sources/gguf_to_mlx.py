"""Convert a llama-architecture GGUF file into an MLX model folder that `mlx_lm.load()` reads.

`mx.load()` reads GGUF itself and keeps Q4_0, Q4_1 and Q8_0 tensors packed as MLX affine
quantization (group size 32), returned as `<name>.weight` plus `<name>.scales` / `<name>.biases`.
So the conversion is a rename, a config.json built from the `llama.*` metadata and a `tokenizers`
BPE built from the GGUF vocabulary. Every other GGML type is refused rather than converted: mx.load
silently dequantizes K-quants and BF16 to float16, and a 4-bit file quietly becoming a float16 model
four times its size is not what a profile asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# GGML type -> bits when kept quantized (None: stored as float).
SUPPORTED_TYPES: dict[gguf.GGMLQuantizationType, int | None] = {
    gguf.GGMLQuantizationType.F32: None,
    gguf.GGMLQuantizationType.F16: None,
    gguf.GGMLQuantizationType.Q4_0: 4,
    gguf.GGMLQuantizationType.Q4_1: 4,
    gguf.GGMLQuantizationType.Q8_0: 8,
}
GROUP_SIZE = 32  # every supported GGML block holds 32 values; mx.load keeps that as the group size

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# tokenizer.ggml.pre -> the Hugging Face pre-tokenizer that splits text the way llama.cpp does.
_DIGITS_BYTELEVEL = ("smollm", "starcoder", "refact")
_GPT2 = ("gpt-2", "gpt2")
_LLAMA3 = ("llama-bpe", "llama3")
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class GGUFConversionError(ValueError):
    """The GGUF cannot become an MLX model; the message says why. Engines wrap it in ModelLoadError."""


def read_gguf(gguf_path: Path) -> gguf.GGUFReader:
    """Parse the header, metadata and tensor table; a truncated or foreign file raises a clear error."""
    if not gguf_path.is_file():
        raise GGUFConversionError(f"{gguf_path}: no such GGUF file")
    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as exc:  # gguf-py reports damage as ValueError, IndexError, struct errors...
        raise GGUFConversionError(
            f"{gguf_path}: not a readable GGUF file (corrupt or truncated?): {exc}"
        ) from exc


def _meta(reader: gguf.GGUFReader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFConversionError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _module_path(tensor_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj`; None when llama has no such tensor."""
    base, _, suffix = tensor_name.rpartition(".")
    if suffix != "weight":
        return None
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return _TOP_NAMES.get(base)


def _check_tensors(reader: gguf.GGUFReader) -> dict[str, int | None]:
    """Module path -> bits (None = float) for every tensor, or one error listing all that is wrong."""
    arch = _meta(reader, "general.architecture", "")
    if arch != "llama":
        raise GGUFConversionError(f"architecture {arch!r} is not supported; only 'llama' is")
    unknown = [t.name for t in reader.tensors if _module_path(t.name) is None]
    if unknown:
        raise GGUFConversionError(f"tensors a llama model does not have: {', '.join(unknown[:8])}")
    bad = Counter(t.tensor_type.name for t in reader.tensors if t.tensor_type not in SUPPORTED_TYPES)
    if bad:
        found = ", ".join(f"{name} ({n} tensor{'s' * (n != 1)})" for name, n in sorted(bad.items()))
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise GGUFConversionError(
            f"tensor types {found} cannot be converted to MLX; supported types are {supported}. "
            "Use a Q4_0, Q4_1 or Q8_0 GGUF, or serve this file with the llama.cpp engine."
        )
    return {_module_path(t.name) or "": SUPPORTED_TYPES[t.tensor_type] for t in reader.tensors}


def _quantization(bits: dict[str, int | None]) -> dict[str, Any] | None:
    """mlx-lm's quantization block: the commonest width as default, per-module entries for the rest."""
    norms = ("norm", "layernorm")
    linear = {path: b for path, b in bits.items() if not path.endswith(norms)}
    widths = Counter(b for b in linear.values() if b is not None)
    if not widths:
        return None
    default = widths.most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default}
    for path, b in sorted(linear.items()):
        if b != default:  # older mlx-lm cannot infer per-module widths from the weights
            quant[path] = False if b is None else {"group_size": GROUP_SIZE, "bits": b}
    return quant


def _config(reader: gguf.GGUFReader, bits: dict[str, int | None]) -> dict[str, Any]:
    missing = {"model.embed_tokens", "model.norm"} - bits.keys()
    if missing:
        raise GGUFConversionError(f"GGUF lacks the tensors for {', '.join(sorted(missing))}")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden = int(_meta(reader, "llama.embedding_length"))
    heads = int(_meta(reader, "llama.attention.head_count"))
    head_dim = int(_meta(reader, "llama.attention.key_length", hidden // heads))
    if int(_meta(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFConversionError(
            "partial rotary embeddings (rope.dimension_count != head size) are not supported"
        )
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_meta(reader, "llama.block_count")),
        "intermediate_size": int(_meta(reader, "llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_meta(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(reader, "llama.rope.freq_base", 10000.0)),
        # GGUF stores Q/K rows permuted for llama.cpp's interleaved RoPE, which is MLX's traditional RoPE.
        "rope_traditional": True,
        "max_position_embeddings": int(_meta(reader, "llama.context_length")),
        "vocab_size": int(embd.shape[-1]),  # GGUF shapes are innermost-first
        "tie_word_embeddings": "lm_head" not in bits,
        "attention_bias": False,
        "mlp_bias": False,
    }
    scaling = _meta(reader, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(_meta(reader, "llama.rope.scaling.factor")),
        }
    elif scaling != "none":
        raise GGUFConversionError(f"RoPE scaling type {scaling!r} is not supported")
    for key in ("bos", "eos"):
        if (token_id := _meta(reader, f"tokenizer.ggml.{key}_token_id", None)) is not None:
            config[f"{key}_token_id"] = int(token_id)
    # End-of-turn tokens also stop generation (llama.cpp treats them as end of generation).
    stops = [_meta(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    if len(ids := list(dict.fromkeys(int(i) for i in stops if i is not None))) > 1:
        config["eos_token_id"] = ids
    if (quant := _quantization(bits)) is not None:
        config["quantization"] = quant
    return config


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGITS_BYTELEVEL:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = ", ".join(_DIGITS_BYTELEVEL + _GPT2 + _LLAMA3)
    raise GGUFConversionError(f"tokenizer pre-tokenizer {pre!r} is not supported; supported: {known}")


def _tokenizer(reader: gguf.GGUFReader) -> tuple[Tokenizer, dict[str, Any]]:
    """The `tokenizers` BPE and its tokenizer_config.json, rebuilt from the GGUF vocabulary."""
    model = _meta(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(f"tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2')")
    pre = _meta(reader, "tokenizer.ggml.pre")  # no default: guessing the split would change token ids
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    types: list[int] = _meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # first id wins for duplicates
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special (matched whole, hidden when decoding with skip_special_tokens);
    # user-defined tokens are matched whole but are ordinary text, as in llama.cpp.
    by_type: dict[int, list[str]] = {}
    for text, kind in zip(tokens, types, strict=True):
        by_type.setdefault(kind, []).append(text)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in by_type.get(_CONTROL, [])])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in by_type.get(_USER_DEFINED, [])])
    special = {  # tokenizer_config.json key -> token text, from the GGUF's *_token_id keys
        name: tokens[int(token_id)]
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
        if (token_id := _meta(reader, f"tokenizer.ggml.{key}_token_id", None)) is not None
    }
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and "bos" in special:
        bos = special["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(
            _meta(reader, f"{_meta(reader, 'general.architecture', 'llama')}.context_length", 2048)
        ),
    }
    config.update({f"{name}_token": text for name, text in special.items()})
    if (template := _meta(reader, "tokenizer.chat_template", None)) is not None:
        config["chat_template"] = template
    return tok, config


def _write_tokenizer(tokenizer: tuple[Tokenizer, dict[str, Any]], out_dir: Path) -> None:
    tokenizer[0].save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer[1], indent=2, ensure_ascii=False))


@contextmanager
def _about(gguf_path: Path) -> Iterator[None]:
    """Prefix the file's path to the errors of the helpers, which do not know it."""
    try:
        yield
    except GGUFConversionError as exc:
        raise GGUFConversionError(f"{gguf_path}: {exc}") from None


def gguf_tokenizer_files(gguf_path: Path, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) from a GGUF's vocabulary.

    out_dir must exist. Works on vocab-only GGUFs and on any architecture, since only tokenizer.* is read.
    """
    reader = read_gguf(Path(gguf_path))
    with _about(gguf_path):
        _write_tokenizer(_tokenizer(reader), Path(out_dir))


def convert_gguf_to_mlx(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a llama GGUF (F32/F16/Q4_0/Q4_1/Q8_0 tensors) into an MLX folder at out_dir; return out_dir.

    Raises GGUFConversionError for anything it cannot convert faithfully and FileExistsError when out_dir
    already exists. The folder is built next to out_dir and renamed into place, so a crash never leaves a
    half-written model; if another process finishes the same out_dir first, its result is kept.
    """
    import mlx.core as mx  # imported here: importing MLX is slow and this module is also used for tokenizers

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    reader = read_gguf(gguf_path)
    with _about(gguf_path):  # everything is checked before anything is written
        bits = _check_tensors(reader)
        config = _config(reader, bits)
        tokenizer = _tokenizer(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_tokenizer(tokenizer, tmp)
        try:
            loaded: dict[str, mx.array] = mx.load(str(gguf_path))  # type: ignore[assignment]
        except (RuntimeError, ValueError) as exc:
            raise GGUFConversionError(f"{gguf_path}: MLX could not read the tensors: {exc}") from exc
        weights: dict[str, mx.array] = {}
        for name, array in loaded.items():
            base, _, suffix = name.rpartition(".")  # suffix: weight, scales or biases
            path = _module_path(f"{base}.weight")
            if path is None:
                raise GGUFConversionError(f"{gguf_path}: unexpected tensor {name!r} from mx.load")
            weights[f"{path}.{suffix}"] = array
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished model is an ordinary folder
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp)  # a concurrent conversion of the same file won the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
