"""Prompts for the llama.cpp engine (llamacpp/engine.py): a request's text (the chat template
rendered in our sandbox, prompting.py; a fill-in-the-middle prompt; or the raw prompt) and its
token ids, exactly as generation decodes them."""

from __future__ import annotations

from functools import partial
from typing import Protocol

import llama_cpp

from mlx_serve.engines.errors import UnsupportedRequestError
from mlx_serve.engines.text.prompt_tokens import PromptTokenizer
from mlx_serve.engines.text.prompting import ChatTemplate, TemplateError, build_fim_prompt, render_chat
from mlx_serve.engines.types import GenerationRequest


class PromptModel(Protocol):
    """What prompt building needs of a loaded model (llamacpp.engine._Model)."""

    @property
    def llm(self) -> llama_cpp.Llama: ...
    @property
    def template(self) -> ChatTemplate | None: ...
    @property
    def fim(self) -> tuple[str, str, str] | None: ...
    @property
    def prompt_tokens(self) -> PromptTokenizer | None: ...


def build_prompt(model: PromptModel, request: GenerationRequest, model_id: str) -> tuple[list[int], str]:
    """(tokens, text) exactly as generate() decodes them."""
    llm, template = model.llm, model.template
    add_special = request.add_special_tokens
    if request.messages is not None:
        if template is None:
            raise UnsupportedRequestError(f"model {model_id!r} has no chat template; send a raw prompt")
        if request.suffix is not None:
            raise UnsupportedRequestError("fill-in-the-middle takes a raw prompt, not messages")
        try:
            text = render_chat(template, request.messages, request.tools, request.enable_thinking)
        except TemplateError as exc:
            raise UnsupportedRequestError(str(exc)) from None
        bos = template.bos_token
        add_special = add_special and not (bos and text.startswith(bos))
    elif request.suffix is not None:
        if model.fim is None:
            raise UnsupportedRequestError(f"model {model_id!r} has no fill-in-the-middle tokens")
        text = build_fim_prompt(request.prompt or "", request.suffix, model.fim)
    else:
        text = request.prompt or ""
    if add_special or model.prompt_tokens is None:  # what the vocabulary adds: tokenized whole
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)
    else:
        tokens = model.prompt_tokens.encode(text)
    if not tokens:
        bos = llm.token_bos()
        if bos < 0:
            raise UnsupportedRequestError("the prompt is empty")
        tokens = [bos]
    return tokens, text


def prompt_tokenizer(llm: llama_cpp.Llama, vocab: list[str]) -> PromptTokenizer:
    """Tokenizes prompts reusing earlier prompts' ids; `vocab` is the GGUF's token texts."""
    return PromptTokenizer(partial(_tokenize, llm), control_tokens(llm, vocab))


def _tokenize(llm: llama_cpp.Llama, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def control_tokens(llm: llama_cpp.Llama, tokens: list[str]) -> dict[str, int]:
    """The vocabulary's control tokens (<|im_start|>, [INST], ...): text -> id."""
    vocab = llm._model.vocab
    return {
        text: i
        for i, text in enumerate(tokens)
        if len(text) > 1
        and text[0] in "<["  # a cheap filter before asking llama.cpp
        and llama_cpp.llama_vocab_get_attr(vocab, i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    }
