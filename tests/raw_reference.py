"""What the raw engines generate greedily on this machine: the reference for content tests.

A small model's greedy text depends on the kernels it runs on (AVX2, AVX-512, NEON and Metal round
differently, and SmolLM2 has near-ties: on one AMD EPYC "Which city is the capital of France?"
gets "Le Grand Château, also known as the City of Light, is"). So a content test does not assert
words; it asserts that the daemon or engine gives exactly what llama-cpp-python (or mlx-lm) gives
for the same prompt tokens on the same machine.

The llama.cpp reference loads the GGUF with the settings the engine derives from a ModelSpec
(llamacpp.load.llama_kwargs: context size, threads, GPU layers, flash attention; the test profile
runs one thread), then decodes with llama-cpp-python's own generate(), stopping at an
end-of-generation token. Chat prompts are rendered with the project's sandboxed renderer and the
GGUF's own chat template, as the engine renders them, and tokenized by llama.cpp. References are
cached per prompt: the dialect tests ask for the same few.

Loaded by conftest.py as `mlx_serve_test_raw_reference` (tests/ is not a package).
"""

from __future__ import annotations

import atexit
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import llama_cpp

from mlx_serve.engines.llamacpp.load import llama_kwargs, read_gguf_header
from mlx_serve.engines.text.prompting import ChatTemplate, render_chat
from mlx_serve.engines.types import GenerationRequest, Message, ToolSpec
from mlx_serve.profiles.schema import ModelSpec

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Completion:
    prompt: str  # the prompt text, special tokens included
    prompt_tokens: int
    tokens: tuple[int, ...]  # generated, the end-of-generation token excluded
    text: str
    finish: str  # "stop": an end-of-generation token ended it; "length": max_tokens did

    @property
    def completion_tokens(self) -> int:
        """As the engines count usage: the end-of-generation token included."""
        return len(self.tokens) + (self.finish == "stop")

    def tool_call(self) -> dict[str, Any] | None:
        """The first Hermes call the text holds, {"name": ..., "arguments": {...}}, else None."""
        match = TOOL_CALL.search(self.text)
        if match is None:
            return None
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return None
        return call if isinstance(call, dict) and "name" in call else None


def _settings(settings: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted({"threads": 1, **settings}.items()))


@cache
def _llama(path: str, settings: tuple[tuple[str, Any], ...]) -> llama_cpp.Llama:
    spec = ModelSpec(source=path, engine="llama_cpp", **dict(settings))
    llm = llama_cpp.Llama(path, **llama_kwargs(spec, read_gguf_header(Path(path))))
    atexit.register(llm.close)  # before interpreter teardown, when Llama.__del__ would fail noisily
    return llm


@cache
def _template(path: str) -> ChatTemplate:
    header = read_gguf_header(Path(path))

    def text_of(key: str) -> str:
        tid = header.metadata.get(key)
        return header.tokens[tid] if isinstance(tid, int) and 0 <= tid < len(header.tokens) else ""

    source = header.metadata.get("tokenizer.chat_template")
    assert source, f"{path} has no chat template"
    return ChatTemplate(
        source, text_of("tokenizer.ggml.bos_token_id"), text_of("tokenizer.ggml.eos_token_id")
    )


def chat_prompt(path: Path, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> str:
    """The prompt text the llama.cpp engine renders for this conversation."""
    return render_chat(_template(str(path)), messages, tools)


@cache
def _greedy(
    path: str, prompt: str, max_tokens: int, add_bos: bool, settings: tuple[tuple[str, Any], ...]
) -> Completion:
    llm = _llama(path, settings)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    vocab = llm._model.vocab
    llm.reset()  # no prefix left from an earlier reference: the whole prompt is evaluated
    out: list[int] = []
    finish = "length"
    for token in llm.generate(ids, temp=0.0, top_k=1):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            finish = "stop"
            break
        out.append(token)
        if len(out) == max_tokens:
            break
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    return Completion(prompt, len(ids), tuple(out), text, finish)


def llama_greedy(
    path: Path, prompt: str, max_tokens: int, add_bos: bool = True, **settings: Any
) -> Completion:
    """Greedy decoding of a raw prompt by llama-cpp-python; `settings` are ModelSpec fields
    (threads=1 unless given, as in the test profile)."""
    return _greedy(str(path), prompt, max_tokens, add_bos, _settings(settings))


def llama_chat(
    path: Path,
    messages: Sequence[Message],
    max_tokens: int,
    tools: Sequence[ToolSpec] = (),
    **settings: Any,
) -> Completion:
    """Greedy decoding of a conversation, rendered as the engine renders it. The template brings
    its own BOS if it has one, so none is added then (engines/llamacpp/prompt.build_prompt)."""
    text = chat_prompt(path, messages, tools)
    bos = _template(str(path)).bos_token
    return _greedy(str(path), text, max_tokens, not (bos and text.startswith(bos)), _settings(settings))


def llama_request(path: Path, request: GenerationRequest, **settings: Any) -> Completion:
    """The reference for an engine request (a dialect's translation of a body): its conversation
    and tools, or its raw prompt, greedy, up to its max_tokens."""
    max_tokens = request.sampling.max_tokens
    assert max_tokens is not None and request.suffix is None
    if request.messages is not None:
        return llama_chat(path, request.messages, max_tokens, request.tools, **settings)
    return llama_greedy(path, request.prompt or "", max_tokens, request.add_special_tokens, **settings)


def user(content: str) -> tuple[Message, ...]:
    return (Message("user", content),)


def mlx_greedy(folder: Path, messages: Sequence[Message] | str, max_tokens: int) -> Completion:
    """Greedy decoding by mlx-lm of a raw prompt or a conversation (its chat template)."""
    return _mlx_greedy(str(folder), messages if isinstance(messages, str) else tuple(messages), max_tokens)


@cache
def _mlx_model(folder: str) -> tuple[Any, Any]:
    import mlx_lm  # MLX only for the tests that use it

    return mlx_lm.load(folder)


@cache
def _mlx_greedy(folder: str, messages: tuple[Message, ...] | str, max_tokens: int) -> Completion:
    import mlx_lm

    model, tokenizer = _mlx_model(folder)
    if isinstance(messages, str):
        prompt, ids = messages, tokenizer.encode(messages)
    else:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    responses = list(mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=max_tokens))
    tokens = [r.token for r in responses if r.token not in tokenizer.eos_token_ids]
    finish = responses[-1].finish_reason or "length"
    return Completion(prompt, len(ids), tuple(tokens), tokenizer.decode(tokens), finish)
