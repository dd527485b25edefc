"""Loading GGUF files into llama-cpp-python safely, and the settings the profile asks for.

A crash inside the native loader would take the whole daemon down, so every file is checked in
pure Python first (sources/gguf.py): its structure (`read_gguf_header`: magic, version, metadata,
tensor table, every tensor's data inside the file), then what llama.cpp would abort on while
loading it (`check_loadable`: layer, head and expert counts, the vocabulary, the trained context).
llama.cpp's own failures (e.g. an unknown architecture) raise a plain ValueError from `Llama(...)`;
they become ModelLoadError with llama.cpp's last error line.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp._internals import LlamaContext

from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.sources.gguf import GGUFFormatError, GGUFHeader, check_loadable, read_gguf_header
from mlx_serve.profiles.schema import ModelSpec

log = logging.getLogger("mlx_serve.engines.llama_cpp")

DEFAULT_MAX_CONTEXT = 8192  # n_ctx when the profile sets none: min(trained context, this)
# Bytes per element of the KV cache by profile kv bits: f16, Q8_0 (34 B / 32), Q4_0 (18 B / 32).
KV_TYPES: dict[int | None, tuple[int, float]] = {
    None: (llama_cpp.GGML_TYPE_F16, 2.0),
    8: (llama_cpp.GGML_TYPE_Q8_0, 34 / 32),
    4: (llama_cpp.GGML_TYPE_Q4_0, 18 / 32),
}


def physical_cores() -> int:
    """Physical (performance) cores: llama.cpp's defaults are wrong on small machines (ARCHITECTURE.md "Verified facts")."""
    if sys.platform == "darwin":
        for key in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=2)
                if out.returncode == 0 and out.stdout.strip().isdigit():
                    return max(1, int(out.stdout.strip()))
            except (OSError, subprocess.SubprocessError):
                pass
    try:
        cpus = os.sched_getaffinity(0)
        cores = set()
        for cpu in cpus:
            topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(
                ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
            )
        return max(1, len(cores))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def context_length(spec: ModelSpec, header: GGUFHeader) -> int:
    """The profile's context_length, else the trained context capped at DEFAULT_MAX_CONTEXT."""
    trained = header.arch_value("context_length")
    trained = trained if isinstance(trained, int) and trained > 0 else None
    if spec.context_length:
        if trained and spec.context_length > trained:
            log.warning("context_length %d exceeds the trained context %d", spec.context_length, trained)
        return spec.context_length
    return min(trained or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)


def kv_cache_bytes(header: GGUFHeader, n_ctx: int, kv_bits: int | None) -> int:
    """n_ctx * n_layer * (K + V width) * bytes per element."""
    n_layer = header.arch_value("block_count", 0) or 0
    n_embd = header.arch_value("embedding_length", 0) or 0
    n_head = header.arch_value("attention.head_count", 0) or 0
    n_head_kv = header.arch_value("attention.head_count_kv", n_head) or n_head
    if not isinstance(n_head, int) or not isinstance(n_head_kv, int) or not n_head:
        return 0  # per-layer head counts (arrays) or unusual architectures: no estimate
    k_len = header.arch_value("attention.key_length", n_embd // n_head)
    v_len = header.arch_value("attention.value_length", n_embd // n_head)
    return int(n_ctx * n_layer * n_head_kv * (k_len + v_len) * KV_TYPES[kv_bits][1])


def _uses_prompt_lookup(spec: ModelSpec) -> bool:
    return spec.speculative is not None and spec.speculative.prompt_lookup is not None


def flash_attention(spec: ModelSpec) -> bool:
    """Whether the engine runs llama.cpp with flash attention.

    llama.cpp refuses a quantized V cache without it, so kv bits turn it on whatever the profile
    says. Prompt lookup does too: without it, attention over a batch of drafted tokens rounds
    differently from one token at a time, and greedy output would drift from plain decoding.
    Otherwise the profile decides; by default it is on where the model's layers run on a GPU
    (Metal), as llama.cpp's own default has it, and off on the CPU: measured here with SmolLM2 on
    2 cores, the CPU kernel decodes 9% faster with 50 tokens of context (153 against 139 tok/s)
    but 30% slower with 1,900 (46 against 67), and reads 12 new tokens after 1,800 cached in
    140 ms against 75. Editors and agents work at the long end."""
    if (spec.kv_cache is not None and spec.kv_cache.bits is not None) or _uses_prompt_lookup(spec):
        return True
    if spec.flash_attn is not None:
        return spec.flash_attn
    return spec.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())


def llama_kwargs(spec: ModelSpec, header: GGUFHeader) -> dict[str, Any]:
    threads = spec.threads or physical_cores()
    kv_bits = spec.kv_cache.bits if spec.kv_cache else None
    kwargs: dict[str, Any] = {
        "n_ctx": context_length(spec, header),
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": spec.n_gpu_layers,
        "flash_attn": flash_attention(spec),
        "embedding": spec.embedding,
        "verbose": False,
    }
    if kv_bits is not None:
        kwargs["type_k"] = kwargs["type_v"] = KV_TYPES[kv_bits][0]
    if spec.embedding:  # a whole input must fit one batch: embeddings are never truncated
        kwargs["n_batch"] = kwargs["n_ubatch"] = kwargs["n_ctx"]
    if spec.embedding and header.arch_value("pooling_type") is None:
        kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN  # causal LMs carry no pooling type
    return kwargs


# llama.cpp's log goes through this callback: debug logging, plus the recent warnings and errors,
# which name the reason when a load fails (the Python wrapper only says "Failed to load model").
_WARN, _ERROR = 3, 4  # ggml_log_level (ggml.h): 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT
# Per thread: each engine loads on its own thread, so concurrent loads keep their reasons apart.
_state = threading.local()


def _recent() -> deque[tuple[int, str]]:
    if not hasattr(_state, "recent"):
        _state.recent, _state.partial, _state.level = deque(maxlen=32), [], 0
    return _state.recent


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    recent = _recent()
    if level != 5:  # CONT continues the previous message
        _state.level = level
    _state.partial.append(text.decode("utf-8", errors="replace"))
    if not _state.partial[-1].endswith("\n"):
        return
    line = "".join(_state.partial).strip()
    _state.partial.clear()
    if _state.level in (_WARN, _ERROR) and line:
        recent.append((_state.level, line))
    log.debug("llama.cpp: %s", line)


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _llama_reason(default: str) -> str:
    """The first error llama.cpp logged (the root cause), else its last warning, else `default`."""
    errors = [line for level, line in _recent() if level == _ERROR]
    warnings = [line for level, line in _recent() if level == _WARN]
    line = errors[0] if errors else warnings[-1] if warnings else default
    return line.split(": ", 1)[1] if re.match(r"^\w+: ", line) else line


def load_llama(model_id: str, path: Path, spec: ModelSpec) -> tuple[llama_cpp.Llama, GGUFHeader]:
    """Validate the file, then load it; every failure is a ModelLoadError naming the model."""
    try:
        header = read_gguf_header(path)
        check_loadable(header)
    except GGUFFormatError as exc:
        raise ModelLoadError(model_id, f"{path.name}: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(model_id, f"cannot read {path.name}: {exc.strerror or exc}") from None
    kwargs = llama_kwargs(spec, header)
    _recent().clear()
    try:
        llm = llama_cpp.Llama(str(path), **kwargs)
    except (ValueError, RuntimeError, OSError) as exc:
        reason = _llama_reason(str(exc))
        raise ModelLoadError(
            model_id, f"llama.cpp could not load {path.name} (architecture {header.architecture!r}): {reason}"
        ) from None
    if sequences(spec) > 1:
        try:
            use_sequences(llm, sequences(spec))
        except ValueError:
            llm.close()
            reason = _llama_reason("cannot create the context")
            raise ModelLoadError(
                model_id, f"llama.cpp: {sequences(spec)} sequences of {kwargs['n_ctx']} tokens: {reason}"
            ) from None
    return llm, header


def sequences(spec: ModelSpec) -> int:
    """Sequences one context decodes together: the profile's max_concurrency (embeddings: 1)."""
    return 1 if spec.embedding else spec.max_concurrency


def use_sequences(llm: llama_cpp.Llama, n_seq: int) -> None:
    """Replace the Llama's context with one that decodes `n_seq` sequences together (ARCHITECTURE.md "Verified facts":
    `Llama` does not expose n_seq_max), with the same settings (threads, KV type, flash attention,
    batch) and n_seq times the profile's context as `n_seq` separate KV streams (`kv_unified =
    False`): llama.cpp gives each sequence n_ctx / n_seq_max cells (llama_n_ctx_seq, padded to 256),
    so every request, capped at the profile's context, has its own full context.

    Not the unified cache first measured: with one unified buffer every token attends over the cells of all
    sequences (masked), so cost grows with N times the total context, and the prefix caches idle
    slots keep slow every step. Measured here on SmolLM2 (CPU time per token, 1 thread): batch 8
    with 600-token contexts 1.7x cheaper split; batch 1 beside idle caches 37% cheaper split;
    short contexts about equal (unified ~9% cheaper at batch 8). Split decode is also batch-invariant
    (each sequence's attention is its own one-row matmul), so batched greedy output equals solo.
    A step's sequence ids should be contiguous: llama.cpp splits a batch into one pass per run of
    consecutive ids (llamacpp/slots.py picks slots accordingly).
    The Llama keeps its own `context_params` (the per-sequence n_ctx the engine reports); the new
    context is freed with the model (LlamaContext registers itself on the model's exit stack)."""
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx = llm.context_params.n_ctx * n_seq
    params.n_seq_max = n_seq
    params.kv_unified = False
    llm._ctx.close()  # free the single-sequence KV cache before allocating the larger one
    llm._ctx = LlamaContext(model=llm._model, params=params, verbose=False)
