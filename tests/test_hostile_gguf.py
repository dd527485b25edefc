"""Malformed GGUF headers that llama.cpp aborts on (GGML_ASSERT: SIGABRT takes the whole daemon
down) or misreads (a trained context of 2**32 - 1 reads as -1: every request a 500). The pure-Python
check in engines/sources/gguf.py refuses them before llama.cpp sees the file, so the load of THAT
model fails with the reason and every other model keeps serving.

Every file is a tiny random llama (hidden 64, 2 layers, a 258-token byte-level BPE vocabulary)
written with gguf-py in milliseconds; each bad one differs from the good one in one field.
Measured with llama-cpp-python 0.3.36 (`Llama(path)` in a subprocess): the ABORTING cases end
the process with SIGABRT (context 2**32 - 1: ValueError on every tokenize instead); the others
are refused by llama.cpp with a generic "Failed to load model", and the check names the problem,
except a context of 2**25, which llama.cpp serves but refused here as implausible (past 2**24;
llama-cpp-python zeroes a 4-bytes-a-token buffer of that length on every tokenize).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from pathlib import Path
from typing import Any

import gguf
import httpx
import llama_cpp
import numpy as np
import pytest

from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.llamacpp.engine import LlamaCppEngine
from mlx_serve.engines.sources.gguf import GGUFFormatError, check_loadable, read_gguf_header
from mlx_serve.engines.types import GenerationRequest, SamplingParams
from mlx_serve.profiles.schema import ModelSpec
from mlx_serve_test_harness import Daemon, profile_text

T = gguf.GGUFValueType
REMOVE = object()  # an override that drops the key
HIDDEN, LAYERS, HEADS, KV_HEADS, FF = 64, 2, 4, 2, 128


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: llama.cpp's BPE tokenizer needs a token for every byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


VOCAB = [*_byte_chars(), "ab", "<|endoftext|>"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _metadata() -> dict[str, tuple]:
    return {
        "llama.context_length": (T.UINT32, 2048),
        "llama.embedding_length": (T.UINT32, HIDDEN),
        "llama.block_count": (T.UINT32, LAYERS),
        "llama.feed_forward_length": (T.UINT32, FF),
        "llama.attention.head_count": (T.UINT32, HEADS),
        "llama.attention.head_count_kv": (T.UINT32, KV_HEADS),
        "llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, 1e-5),
        "llama.rope.dimension_count": (T.UINT32, HIDDEN // HEADS),
        "general.file_type": (T.UINT32, int(gguf.LlamaFileType.ALL_F32)),
        "tokenizer.ggml.model": (T.STRING, "gpt2"),
        "tokenizer.ggml.pre": (T.STRING, "default"),
        "tokenizer.ggml.tokens": (T.ARRAY, VOCAB, T.STRING),
        "tokenizer.ggml.token_type": (T.ARRAY, [1] * (len(VOCAB) - 1) + [3], T.INT32),
        "tokenizer.ggml.merges": (T.ARRAY, ["a b"], T.STRING),
        "tokenizer.ggml.bos_token_id": (T.UINT32, len(VOCAB) - 1),
        "tokenizer.ggml.eos_token_id": (T.UINT32, len(VOCAB) - 1),
        "tokenizer.chat_template": (T.STRING, TEMPLATE),
    }


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    kv = KV_HEADS * HIDDEN // HEADS
    norm = np.ones(HIDDEN, np.float32)
    out = {"token_embd.weight": w(len(VOCAB), HIDDEN), "output_norm.weight": norm}
    out["output.weight"] = w(len(VOCAB), HIDDEN)
    for i in range(LAYERS):
        p = f"blk.{i}."
        out |= {p + "attn_norm.weight": norm, p + "ffn_norm.weight": norm}
        out |= {p + "attn_q.weight": w(HIDDEN, HIDDEN), p + "attn_output.weight": w(HIDDEN, HIDDEN)}
        out |= {p + "attn_k.weight": w(kv, HIDDEN), p + "attn_v.weight": w(kv, HIDDEN)}
        out |= {p + "ffn_gate.weight": w(FF, HIDDEN), p + "ffn_up.weight": w(FF, HIDDEN)}
        out[p + "ffn_down.weight"] = w(HIDDEN, FF)
    return out


class _Writer(gguf.GGUFWriter):
    """gguf-py refuses to write an empty array; a hostile file has one."""

    def _pack_val(self, val: Any, vtype: T, add_vtype: bool, sub_type: T | None = None) -> bytes:
        if vtype == T.ARRAY and len(val) == 0 and sub_type is not None:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def write_gguf(path: Path, meta: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """The tiny model with `meta` overriding metadata (key: (type, value[, sub type]) or REMOVE)
    and the tensors named in `drop` left out ("*": all of them: a vocabulary-only file)."""
    fields = _metadata()
    for key, value in (meta or {}).items():
        if value is REMOVE:
            fields.pop(key)
        else:
            fields[key] = value
    writer = _Writer(path, "llama")
    for key, (vtype, value, *sub) in fields.items():
        writer.add_key_value(key, value, vtype, sub[0] if sub else None)
    for name, array in _tensors().items():
        if "*" not in drop and name not in drop:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def u32(value: int) -> tuple:
    return (T.UINT32, value)


_DUPLICATE = [*VOCAB[:6], VOCAB[5], *VOCAB[7:]]  # token 6 spelled like token 5
# name: (metadata overrides, tensors dropped, what the refusal must say)
CASES: dict[str, tuple[dict[str, Any], tuple[str, ...], str]] = {
    # llama.cpp aborts (SIGABRT) on these:
    "block-count-0": (
        {"llama.block_count": u32(0)},
        (),
        r"llama\.block_count is 0; llama\.cpp needs 1 to 512",
    ),
    "block-count-1000": ({"llama.block_count": u32(1000)}, (), r"llama\.block_count is 1000"),
    "duplicate-token": (
        {"tokenizer.ggml.tokens": (T.ARRAY, _DUPLICATE, T.STRING)},
        (),
        r"tokens 5 and 6 have the same text",
    ),
    "experts-used-without-experts": (
        {"llama.expert_used_count": u32(2)},
        (),
        r"llama\.expert_used_count is 2, more than expert_count 0",
    ),
    "rope-scaling-unknown": (
        {"llama.rope.scaling.type": (T.STRING, "bogus")},
        (),
        r"rope\.scaling\.type is 'bogus'",
    ),
    "experts-none-used": (
        {"llama.expert_count": u32(4), "llama.expert_used_count": u32(0)},
        (),
        r"expert_count is 4 but expert_used_count is 0",
    ),
    "nextn-past-layers": ({"llama.nextn_predict_layers": u32(5)}, (), r"nextn_predict_layers is 5"),
    # loads, then every request is a 500 ("Array length must be >= 0"):
    "context-4294967295": ({"llama.context_length": u32(2**32 - 1)}, (), r"context_length is 4294967295"),
    # llama.cpp refuses these with an exception; the check names the problem:
    "block-count-short": (
        {"llama.block_count": u32(1)},
        (),
        r"block_count is 1 but .* layer 1 \(blk\.1\.\*\)",
    ),
    "block-count-long": ({"llama.block_count": u32(3)}, (), r"block_count is 3 but .* only 2 layers"),
    "embedding-length-0": ({"llama.embedding_length": u32(0)}, (), r"embedding_length is 0"),
    "head-count-0": ({"llama.attention.head_count": u32(0)}, (), r"head_count is 0 but .*attn_q"),
    "head-count-3": (
        {"llama.attention.head_count": u32(3)},
        (),
        r"head_count 3 does not divide embedding_length 64",
    ),
    "head-count-kv-3": ({"llama.attention.head_count_kv": u32(3)}, (), r"head_count_kv 3 does not divide"),
    "context-33554432": ({"llama.context_length": u32(2**25)}, (), r"context_length is 33554432"),
    "tokens-empty": (
        {"tokenizer.ggml.tokens": (T.ARRAY, [], T.STRING), "tokenizer.ggml.token_type": REMOVE},
        (),
        r"tokenizer\.ggml\.tokens is empty",
    ),
    "tokens-not-strings": (
        {"tokenizer.ggml.tokens": (T.ARRAY, list(range(len(VOCAB))), T.INT32)},
        (),
        r"tokenizer\.ggml\.tokens is an array of type 5",
    ),
    "tokens-missing": ({"tokenizer.ggml.tokens": REMOVE}, (), r"tokenizer\.ggml\.tokens is missing"),
    "token-types-short": (
        {"tokenizer.ggml.token_type": (T.ARRAY, [1] * 10, T.INT32)},
        (),
        r"token_type has 10 entries for 258 tokens",
    ),
    "scores-short": (
        {"tokenizer.ggml.scores": (T.ARRAY, [0.0] * 10, T.FLOAT32)},
        (),
        r"scores has 10 entries for 258 tokens",
    ),
    "scores-strings": (
        {"tokenizer.ggml.scores": (T.ARRAY, VOCAB, T.STRING)},
        (),
        r"scores is not an array of float32",
    ),
    "merges-not-strings": (
        {"tokenizer.ggml.merges": (T.ARRAY, [1, 2], T.INT32)},
        (),
        r"merges is not an array of strings",
    ),
    "no-token-embd": ({}, ("token_embd.weight",), r"no token_embd\.weight tensor"),
    "no-tensors": ({}, ("*",), r"no tensors \(a vocabulary-only file\?\)"),
}
ABORTING = [
    "block-count-0",
    "block-count-1000",
    "duplicate-token",
    "experts-used-without-experts",
    "rope-scaling-unknown",
    "experts-none-used",
    "nextn-past-layers",
    "context-4294967295",
]


def build(tmp: Path, name: str) -> Path:
    meta, drop, _ = CASES[name]
    return write_gguf(tmp / f"{name}.gguf", meta, drop)


@pytest.mark.parametrize("name", list(CASES))
def test_header_check_refuses(tmp_path: Path, name: str) -> None:
    path = build(tmp_path, name)
    header = read_gguf_header(path)  # the structure is sound: only the meaning is wrong
    with pytest.raises(GGUFFormatError, match=CASES[name][2]):
        check_loadable(header)


def test_valid_files_pass(tmp_path: Path, smollm2_gguf: Path, tiny_gguf: Path, tiny_fim_gguf: Path) -> None:
    for path in (write_gguf(tmp_path / "good.gguf"), smollm2_gguf, tiny_gguf, tiny_fim_gguf):
        check_loadable(read_gguf_header(path))
    # Texts that differ only in invalid UTF-8 decode alike but are distinct tokens to llama.cpp.
    raw = [*VOCAB[:-2], b"\xfe", b"\xff"]
    distinct = write_gguf(tmp_path / "raw-bytes.gguf", {"tokenizer.ggml.tokens": (T.ARRAY, raw, T.STRING)})
    check_loadable(read_gguf_header(distinct))
    # A vocabulary-only file (no tensors) passes the vocabulary checks, and llama.cpp reads it so.
    vocab = write_gguf(tmp_path / "vocab.gguf", drop=("*",))
    check_loadable(read_gguf_header(vocab), vocab_only=True)
    llama_cpp.Llama(str(vocab), vocab_only=True, verbose=False).close()
    with pytest.raises(GGUFFormatError, match="tokens 5 and 6"):
        check_loadable(read_gguf_header(build(tmp_path, "duplicate-token")), vocab_only=True)


def _spec(path: Path, **kw: Any) -> ModelSpec:
    return ModelSpec(source=str(path), engine="llama_cpp", threads=1, **kw)


def test_the_good_file_loads_and_a_bad_one_is_a_load_error(tmp_path: Path) -> None:
    """The baseline every case differs from is a model llama.cpp serves; a bad one fails as a
    ModelLoadError naming the model, the file and the problem."""

    async def run() -> None:
        good = LlamaCppEngine("good", _spec(write_gguf(tmp_path / "good.gguf"), context_length=256))
        await good.load()
        try:
            request = GenerationRequest(prompt="ab ab", sampling=SamplingParams(temperature=0, max_tokens=2))
            events = [e async for e in good.generate(request)]
            assert events[-1].usage.completion_tokens >= 1
        finally:
            await good.unload()
        for name in ("block-count-long", "context-4294967295"):
            path = build(tmp_path, name)
            with pytest.raises(ModelLoadError) as err:
                await LlamaCppEngine(f"bad-{name}", _spec(path)).load()
            assert f"'bad-{name}'" in str(err.value) and path.name in err.value.reason
            # the reason is the check's, not llama.cpp's own ("missing tensor ...")
            assert re.search(CASES[name][2], err.value.reason), err.value.reason

    asyncio.run(run())


# ---- the real daemon: one good model, the bad ones beside it ----------------------------------


@pytest.fixture(scope="module")
def hostile_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    home = tmp_path_factory.mktemp("hostile-home")
    models: dict[str, dict] = {"tiny": {"source": str(tiny_gguf), "engine": "llama_cpp", "ttl": "forever"}}
    for name in ABORTING:
        models[f"bad-{name}"] = {"source": str(build(home, name)), "engine": "llama_cpp"}
    profile = home / "config.toml"
    profile.write_text(profile_text(models))
    daemon = Daemon(profile, home).start()
    yield daemon
    daemon.stop()


def _chat(http: httpx.Client, dialect: str, model: str) -> httpx.Response:
    messages = [{"role": "user", "content": "hello"}]
    if dialect == "anthropic":
        body = {"model": model, "messages": messages, "max_tokens": 2}
        return http.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    if dialect == "ollama":
        body = {"model": model, "messages": messages, "stream": False, "options": {"num_predict": 2}}
        return http.post("/api/chat", json=body)
    return http.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 2})


def _error_message(dialect: str, body: dict) -> str:
    """The error's message, asserting the dialect's error shape."""
    if dialect == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "overloaded_error", body
        return body["error"]["message"]
    if dialect == "ollama":
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return body["error"]
    assert set(body["error"]) >= {"message", "type", "code"}, body
    assert body["error"]["type"] == "server_error", body
    return body["error"]["message"]


@pytest.mark.parametrize("name", ABORTING)
def test_a_bad_model_fails_its_load_and_the_daemon_serves_on(hostile_daemon: Daemon, name: str) -> None:
    model, reason = f"bad-{name}", CASES[name][2]
    with httpx.Client(base_url=hostile_daemon.url, timeout=120) as http:
        for dialect in ("openai", "anthropic", "ollama"):  # the first loads (and fails), the rest see it
            try:
                r = _chat(http, dialect, model)
            except httpx.TransportError as exc:  # the connection dropped: did the daemon die?
                r = exc
                with contextlib.suppress(subprocess.TimeoutExpired):
                    hostile_daemon.proc.wait(10)
            proc = hostile_daemon.proc
            assert proc is not None and proc.poll() is None, (
                f"the daemon died (exit {proc.returncode}):\n{hostile_daemon.logs()[-3000:]}"
            )
            assert isinstance(r, httpx.Response), r
            assert r.status_code == 503, (dialect, r.status_code, r.text)
            message = _error_message(dialect, r.json())
            assert model in message and re.search(reason, message), (dialect, message)
        status = {m["id"]: m for m in hostile_daemon.get_json("/status")["models"]}[model]
        assert status["state"] == "failed" and re.search(reason, status["error"]), status
        # the log names the model that failed, and why
        assert re.search(rf"model {re.escape(model)} failed to load: .*{reason}", hostile_daemon.logs())
        good = _chat(http, "openai", "tiny")
        assert good.status_code == 200, good.text
        assert good.json()["choices"][0]["message"]["content"]
