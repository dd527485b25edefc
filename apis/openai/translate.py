"""Pure translation between OpenAI wire shapes and the engines' internal types.

Requests: ChatCompletionRequest / CompletionRequest -> GenerationRequest.
Responses: engine events -> `chat.completion`, `chat.completion.chunk`, `text_completion` and
embedding bodies. Nothing here does I/O; the routes drive it.
"""

from __future__ import annotations

import base64
import secrets
import struct
import time
from collections.abc import Sequence
from typing import Any

from mlx_serve.engines.types import (
    Event,
    Finished,
    GenerationRequest,
    Message,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallEvent,
    ToolSpec,
    Usage,
)

from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, NamedToolChoice, SamplingFields

# Internal finish reasons -> OpenAI's. "context_overflow" means the context filled up: a length stop.
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "context_overflow": "length",
    "cancelled": "stop",
    "error": "stop",
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


# ---- requests --------------------------------------------------------------------------------


def _sampling(
    body: SamplingFields, max_tokens: int | None, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        max_tokens=max_tokens,
        stop=tuple(body.stop or ()),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def to_message(wire: ChatMessage) -> Message:
    role = "system" if wire.role == "developer" else wire.role
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in wire.tool_calls or ())
    return Message(
        role=role,  # type: ignore[arg-type]
        content=wire.content or "",
        tool_calls=calls,
        tool_call_id=wire.tool_call_id,
        name=wire.name,
        reasoning=wire.reasoning_content,
    )


def response_format(wire: Any) -> dict[str, Any] | None:
    if wire is None or wire.type == "text":
        return None
    if wire.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "schema": wire.json_schema.schema_}


def chat_request(body: ChatCompletionRequest) -> GenerationRequest:
    """tool_choice "none" offers no tools at all, so the model cannot call one; a named function
    offers only that function. tool_choice itself is passed on for engines that can enforce it."""
    choice = body.tool_choice
    offered = [t.function for t in body.tools or ()]
    if choice == "none":
        offered = []
    elif isinstance(choice, NamedToolChoice):
        offered = [f for f in offered if f.name == choice.function.name]
        choice = {"type": "function", "function": {"name": choice.function.name}}
    tools = tuple(ToolSpec(f.name, f.description or "", f.parameters or {}) for f in offered)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenerationRequest(
        messages=tuple(to_message(m) for m in body.messages),
        tools=tools,
        tool_choice=choice if tools else None,
        sampling=_sampling(body, max_tokens, bool(body.logprobs), body.top_logprobs or 0),
        response_format=response_format(body.response_format),
        enable_thinking=False if body.reasoning_effort == "none" else None,
    )


def completion_request(body: CompletionRequest) -> GenerationRequest:
    wants_logprobs = body.logprobs is not None
    return GenerationRequest(
        prompt=body.prompt,
        suffix=body.suffix,
        sampling=_sampling(body, body.max_tokens, wants_logprobs, body.logprobs or 0),
    )


# ---- shared pieces of responses --------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def finish_reason(finished: Finished) -> str:
    return FINISH_REASONS.get(finished.reason, "stop")


def _token_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    content = [
        _token_logprob(lp.token, lp.logprob) | {"top_logprobs": [_token_logprob(t, p) for t, p in lp.top]}
        for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape; text_offset counts characters from `offset`."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [dict(lp.top) for lp in logprobs],
        "text_offset": offsets,
    }


def tool_call_body(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


# ---- non-streaming bodies --------------------------------------------------------------------


def chat_completion_body(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    reasoning: str,
    calls: Sequence[ToolCallEvent],
    logprobs: Sequence[TokenLogprob] | None,
    finished: Finished,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not calls else None,
        "refusal": None,
    }
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [tool_call_body(e.call) for e in calls]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
        "finish_reason": finish_reason(finished),
    }
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_body(finished.usage),
    }


def completion_body(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    logprobs: Sequence[TokenLogprob] | None,
    finished: Finished,
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "text": text,
        "logprobs": completion_logprobs(logprobs) if logprobs is not None else None,
        "finish_reason": finish_reason(finished),
    }
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_body(finished.usage),
    }


# ---- streaming -------------------------------------------------------------------------------


class ChatChunker:
    """Events -> `chat.completion.chunk` dicts: role first, then content / reasoning_content /
    tool_calls deltas (finish_reason null), a final chunk with the finish_reason, and a usage chunk
    with empty choices when include_usage was asked for."""

    def __init__(self, model: str, include_usage: bool, logprobs: bool, created: int | None = None) -> None:
        self.id = new_id("chatcmpl")
        self.model = model
        self.created = created if created is not None else int(time.time())
        self.include_usage = include_usage
        self.logprobs = logprobs
        self._calls = 0

    def _chunk(
        self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if self.logprobs:
            choice["logprobs"] = logprobs
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta):
            lp = chat_logprobs(event.logprobs) if self.logprobs else None
            return [self._chunk({"content": event.text}, logprobs=lp)]
        if isinstance(event, ReasoningDelta):
            return [self._chunk({"reasoning_content": event.text})]
        if isinstance(event, ToolCallEvent):
            index, call = self._calls, event.call
            self._calls += 1
            head = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            args = {"index": index, "function": {"arguments": call.arguments}}
            return [self._chunk({"tool_calls": [head]}), self._chunk({"tool_calls": [args]})]
        return self.finish(event)

    def finish(self, finished: Finished) -> list[dict[str, Any]]:
        chunks = [self._chunk({}, finish=finish_reason(finished))]
        if self.include_usage:
            chunks.append(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage_body(finished.usage),
                }
            )
        return chunks


class CompletionChunker:
    """Events -> streamed `text_completion` dicts (same shape as the non-streaming body)."""

    def __init__(self, model: str, include_usage: bool, logprobs: bool, created: int | None = None) -> None:
        self.id = new_id("cmpl")
        self.model = model
        self.created = created if created is not None else int(time.time())
        self.include_usage = include_usage
        self.logprobs = logprobs
        self._offset = 0

    def _chunk(self, text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    def start(self) -> list[dict[str, Any]]:
        return []

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta):
            lp = completion_logprobs(event.logprobs, self._offset) if self.logprobs else None
            self._offset += len(event.text)
            return [self._chunk(event.text, logprobs=lp)]
        if isinstance(event, Finished):
            chunks = [self._chunk("", finish=finish_reason(event))]
            if self.include_usage:
                chunks.append(
                    {
                        "id": self.id,
                        "object": "text_completion",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_body(event.usage),
                    }
                )
            return chunks
        return []  # raw completions have no reasoning or tool calls


# ---- embeddings ------------------------------------------------------------------------------


def encode_embedding(vector: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def embedding_body(
    model: str, vectors: Sequence[Sequence[float]], encoding: str, prompt_tokens: int
) -> dict[str, Any]:
    return {
        "object": "list",
        "model": model,
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_embedding(v, encoding)}
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
