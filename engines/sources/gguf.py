"""A GGUF file's header, read and checked in pure Python before llama.cpp sees the file.

A crash inside the native loader takes the whole daemon down (every model, every client), and
llama.cpp answers many malformed headers with GGML_ASSERT, which aborts the process. So two passes
run first, on the header and tensor table only (tensor data is never read, so a 5 GB file costs
milliseconds beyond its vocabulary):

- `read_gguf_header`: the structure: magic, version, metadata, tensor table and that every
  tensor's data lies inside the file.
- `check_loadable`: what llama.cpp asserts on, or misreads, while it loads: layer count against the
  `blk.N.` tensors, head and expert counts, the vocabulary (duplicate texts abort it), the lengths
  of the per-token arrays and a trained context it cannot represent.

Both raise GGUFFormatError with a sentence naming the key and the problem; llamacpp/load.py turns
it into the model's ModelLoadError.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gguf

_MAX_TENSORS = 1 << 20
_MAX_KV = 1 << 20
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SMALL_ARRAY = 1024  # numeric arrays up to this length keep their values (per-layer counts)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_INT32, _FLOAT32, _STRING, _ARRAY = 5, 6, 8, 9
_TOKENS = "tokenizer.ggml.tokens"  # the one string array decoded (FIM detection, duplicate check)

# llama.cpp's limits (src/llama-hparams.h, llama-model.cpp load_hparams).
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# llama.cpp keeps the trained context as uint32 but hands it out as int32 (llama_model_n_ctx_train),
# and llama-cpp-python sizes every tokenize buffer by it (4 bytes a token, zeroed on each call):
# 2**32 - 1 reads as -1 and every request fails ("Array length must be >= 0"), 2**25 costs 128 MB a
# call. No released model is trained past ~10M tokens (Llama 4 Scout: 10,485,760).
MAX_CONTEXT_LENGTH = 1 << 24
_BLOCK = re.compile(r"blk\.(\d+)\.")
_ATTENTION = re.compile(r"blk\.\d+\.attn_(q|qkv|k|v)\.weight$")


class GGUFFormatError(ValueError):
    pass


class GGUFArray(NamedTuple):
    """An array's element type (GGUFValueType) and length; values only for small numeric arrays."""

    etype: int
    count: int
    values: tuple | None = None


@dataclass
class GGUFHeader:
    version: int
    file_size: int
    metadata: dict[str, Any]  # scalar keys; arrays are in `arrays`
    tensor_count: int
    parameter_count: int
    tokens: list[str] = field(default_factory=list)
    arrays: dict[str, GGUFArray] = field(default_factory=dict)
    tensor_names: list[str] = field(default_factory=list)
    duplicate_token: tuple[int, int] | None = None  # the first two ids whose texts are equal

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def quantization(self) -> str | None:
        file_type = self.metadata.get("general.file_type")
        try:
            return (
                gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
            )
        except ValueError:
            return None


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise GGUFFormatError("file ends inside the header (truncated?)")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def raw_string(self) -> bytes:
        n = self.take("<Q")
        if n > len(self.data) - self.pos:
            raise GGUFFormatError("a header string runs past the end of the file (truncated?)")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw

    def string(self) -> str:
        return self.raw_string().decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.take("<Q")
        if n > len(self.data) - self.pos:
            raise GGUFFormatError("a header string runs past the end of the file (truncated?)")
        self.pos += n

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise GGUFFormatError(f"metadata {key!r} has unknown value type {vtype}")
        etype, count = self.take("<I"), self.take("<Q")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype]) * count
            if size > len(self.data) - self.pos:
                raise GGUFFormatError(f"metadata array {key!r} runs past the end of the file (truncated?)")
            values = None
            if count <= _SMALL_ARRAY:
                values = struct.unpack_from(f"<{count}{_SCALARS[etype][1]}", self.data, self.pos)
            self.pos += size
            return GGUFArray(etype, count, values)
        if etype != _STRING:
            raise GGUFFormatError(f"metadata array {key!r} has unsupported element type {etype}")
        if count * 8 > len(self.data) - self.pos:
            raise GGUFFormatError(f"metadata array {key!r} runs past the end of the file (truncated?)")
        if key == _TOKENS:
            return GGUFArray(etype, count, tuple(self.raw_string() for _ in range(count)))
        for _ in range(count):
            self.skip_string()
        return GGUFArray(etype, count)


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse and sanity-check a GGUF file's header and tensor table (no tensor data is read)."""
    file_size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise GGUFFormatError(f"file is only {file_size} bytes; not a GGUF file")
        if head[:4] != b"GGUF":
            raise GGUFFormatError(f"bad magic {head[:4]!r}; not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version} (big-endian or too old/new?)")
        if n_tensors > _MAX_TENSORS or n_kv > _MAX_KV:
            raise GGUFFormatError(f"implausible header: {n_tensors} tensors, {n_kv} metadata keys")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data, version, n_tensors, n_kv, file_size)


def _parse(data: mmap.mmap, version: int, n_tensors: int, n_kv: int, file_size: int) -> GGUFHeader:
    cur = _Cursor(data)
    cur.pos = 24
    metadata: dict[str, Any] = {}
    arrays: dict[str, GGUFArray] = {}
    tokens: list[str] = []
    duplicate = None
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("<I"), key)
        if not isinstance(value, GGUFArray):
            metadata[key] = value
        elif key == _TOKENS and value.etype == _STRING:
            tokens = [raw.decode("utf-8", errors="replace") for raw in value.values or ()]
            duplicate = _first_duplicate(value.values or ())
            arrays[key] = value._replace(values=None)
        else:
            arrays[key] = value
    if "general.architecture" not in metadata:
        raise GGUFFormatError("metadata has no general.architecture")
    tensors = []
    params = 0
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        ttype, offset = cur.take("<I"), cur.take("<Q")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name!r} has unknown type {ttype}") from None
        count = 1
        for d in dims:
            if d == 0 or d > 1 << 40:
                raise GGUFFormatError(f"tensor {name!r} has an implausible shape {dims}")
            count *= d
        if dims[0] % block:
            raise GGUFFormatError(
                f"tensor {name!r} row of {dims[0]} is not a multiple of its block size {block}"
            )
        params += count
        tensors.append((name, offset, count // block * type_size))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"bad general.alignment {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if offset % alignment or data_start + offset + nbytes > file_size:
            raise GGUFFormatError(
                f"tensor {name!r} data lies outside the file ({file_size} bytes): truncated or corrupt"
            )
    names = [name for name, _, _ in tensors]
    return GGUFHeader(version, file_size, metadata, n_tensors, params, tokens, arrays, names, duplicate)


def _first_duplicate(raw_tokens: tuple[bytes, ...]) -> tuple[int, int] | None:
    """The first pair of ids with the same text, compared as llama.cpp does: as bytes, with an
    empty text standing for "[EMPTY_<id>]"."""
    seen: dict[bytes, int] = {}
    for i, raw in enumerate(raw_tokens):
        text = raw or b"[EMPTY_%d]" % i
        first = seen.setdefault(text, i)
        if first != i:
            return first, i
    return None


def check_loadable(header: GGUFHeader, vocab_only: bool = False) -> None:
    """Refuse a header llama.cpp would abort on (GGML_ASSERT) or misread, with the reason.

    A vocabulary-only file (loaded with vocab_only, no tensors) gets only the vocabulary checks.
    Keys of the wrong type are left alone: llama.cpp refuses those with an exception of its own."""
    _check_vocab(header)
    if vocab_only:
        return
    _check_hparams(header)
    _check_tensors(header)


def _uint(header: GGUFHeader, key: str) -> int | None:
    value = header.arch_value(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_vocab(header: GGUFHeader) -> None:
    if header.metadata.get("tokenizer.ggml.model") in ("no_vocab", "none"):
        return  # llama.cpp reads no token list for these
    tokens = header.arrays.get(_TOKENS)
    if tokens is None:
        kind = "is not an array" if _TOKENS in header.metadata else "is missing"
        raise GGUFFormatError(f"{_TOKENS} {kind}: the file has no vocabulary")
    if tokens.etype != _STRING:
        raise GGUFFormatError(f"{_TOKENS} is an array of type {tokens.etype}, not of strings")
    if tokens.count == 0:
        raise GGUFFormatError(f"{_TOKENS} is empty: the file has no vocabulary")
    if header.duplicate_token:
        first, second = header.duplicate_token
        raise GGUFFormatError(
            f"{_TOKENS}: tokens {first} and {second} have the same text "
            f"{header.tokens[second]!r} (llama.cpp aborts on a duplicate token)"
        )
    for key, types in (("scores", (_FLOAT32, _INT32)), ("token_type", (_INT32,))):
        full = f"tokenizer.ggml.{key}"
        array = header.arrays.get(full)
        if array is None and full not in header.metadata:
            continue
        if array is None or array.etype not in types:
            raise GGUFFormatError(f"{full} is not an array of {'float32' if key == 'scores' else 'int32'}")
        if array.count < tokens.count:
            raise GGUFFormatError(f"{full} has {array.count} entries for {tokens.count} tokens")
    merges = header.arrays.get("tokenizer.ggml.merges")
    if (merges is not None and merges.etype != _STRING) or (
        merges is None and "tokenizer.ggml.merges" in header.metadata
    ):
        raise GGUFFormatError("tokenizer.ggml.merges is not an array of strings")


def _check_hparams(header: GGUFHeader) -> None:
    arch = header.architecture
    if arch == "clip":
        return  # a projector: llama.cpp reads no hyperparameters
    n_layer = _uint(header, "block_count")
    if n_layer is not None and not 1 <= n_layer <= MAX_LAYERS:
        raise GGUFFormatError(f"{arch}.block_count is {n_layer}; llama.cpp needs 1 to {MAX_LAYERS} layers")
    n_ctx = _uint(header, "context_length")
    if n_ctx is not None and n_ctx > MAX_CONTEXT_LENGTH:
        raise GGUFFormatError(
            f"{arch}.context_length is {n_ctx}: implausible (over 2**24 = {MAX_CONTEXT_LENGTH} tokens; "
            "llama.cpp reads 2**31 and more as negative)"
        )
    n_embd = _uint(header, "embedding_length")
    if n_embd == 0:
        raise GGUFFormatError(f"{arch}.embedding_length is 0")
    nextn = _uint(header, "nextn_predict_layers")
    if nextn and n_layer is not None and nextn > n_layer:
        raise GGUFFormatError(f"{arch}.nextn_predict_layers is {nextn}, more than block_count {n_layer}")
    _check_heads(header, n_embd)
    _check_experts(header)
    scaling = header.arch_value("rope.scaling.type")
    if isinstance(scaling, str) and scaling not in ROPE_SCALING_TYPES:
        raise GGUFFormatError(
            f"{arch}.rope.scaling.type is {scaling!r}, not one of {', '.join(ROPE_SCALING_TYPES)}"
        )


def _check_heads(header: GGUFHeader, n_embd: int | None) -> None:
    """Scalar head counts only (per-layer arrays vary by design, e.g. layers without attention)."""
    arch = header.architecture
    n_head, n_head_kv = _uint(header, "attention.head_count"), _uint(header, "attention.head_count_kv")
    if n_head is None:
        return
    if n_head == 0:  # recurrent models (Mamba, RWKV) have no heads, and no attention tensors
        attention = next((n for n in header.tensor_names if _ATTENTION.match(n)), None)
        if attention:
            raise GGUFFormatError(f"{arch}.attention.head_count is 0 but the file has {attention!r}")
        return
    explicit = _uint(header, "attention.key_length") is not None
    if n_embd and not explicit and n_embd % n_head:
        raise GGUFFormatError(
            f"{arch}.attention.head_count {n_head} does not divide embedding_length {n_embd}"
        )
    if n_head_kv and n_head % n_head_kv:
        raise GGUFFormatError(
            f"{arch}.attention.head_count_kv {n_head_kv} does not divide head_count {n_head}"
        )


def _check_experts(header: GGUFHeader) -> None:
    """llama.cpp's GGML_ASSERTs on the expert counts (load_hparams)."""
    arch = header.architecture
    n_expert = _uint(header, "expert_count") or 0
    used = header.arrays.get(f"{arch}.expert_used_count")  # a scalar, or one count per layer
    n_used = max(used.values or (0,)) if used else (_uint(header, "expert_used_count") or 0)
    groups, group_used = _uint(header, "expert_group_count") or 0, _uint(header, "expert_group_used_count")
    if arch.startswith("hunyuan") and n_expert <= 1:
        return  # llama.cpp turns a single expert into a dense model
    problem = None
    if n_expert > MAX_EXPERTS:
        problem = f"expert_count is {n_expert}, over llama.cpp's {MAX_EXPERTS}"
    elif n_used > n_expert:
        problem = f"expert_used_count is {n_used}, more than expert_count {n_expert}"
    elif n_expert and not n_used:
        problem = f"expert_count is {n_expert} but expert_used_count is 0"
    elif groups and groups >= n_expert:
        problem = f"expert_group_count is {groups}, not less than expert_count {n_expert}"
    elif groups > 1 and (n_expert % groups or not group_used or group_used >= groups):
        problem = (
            f"expert_count {n_expert}, expert_group_count {groups} and expert_group_used_count "
            f"{group_used} do not fit (groups must divide the experts, 0 < used groups < groups)"
        )
    if problem:
        raise GGUFFormatError(f"{arch}.{problem}")


def _check_tensors(header: GGUFHeader) -> None:
    arch = header.architecture
    if not header.tensor_names:
        raise GGUFFormatError("the file has no tensors (a vocabulary-only file?)")
    if arch != "clip" and "token_embd.weight" not in header.tensor_names:
        raise GGUFFormatError("the file has no token_embd.weight tensor")
    layers = {int(m.group(1)) for n in header.tensor_names if (m := _BLOCK.match(n))}
    n_layer = _uint(header, "block_count")
    if not layers or n_layer is None:
        return
    if max(layers) >= n_layer:
        raise GGUFFormatError(
            f"{arch}.block_count is {n_layer} but the file has tensors for layer {max(layers)} "
            f"(blk.{max(layers)}.*)"
        )
    if max(layers) + 1 < n_layer:
        raise GGUFFormatError(
            f"{arch}.block_count is {n_layer} but the file has tensors for only {max(layers) + 1} layers"
        )
