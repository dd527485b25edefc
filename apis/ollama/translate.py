"""Pure translation between Ollama's wire format and the internal request / event types.

No I/O here: the routes measure time and talk to the registry; these functions only reshape data.
Ollama specifics: tool-call `function.arguments` is a JSON object (not a string), durations in the
final `done` object are nanoseconds, reasoning travels in a separate `thinking` field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlx_serve.apis.errors import RequestError
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
)
from mlx_serve.profiles.units import parse_duration

from .protocol import ChatMessage, ChatRequest, GenerateRequest, Options, Tool

# ---- requests ------------------------------------------------------------------------------


def keep_alive_seconds(value: Any, profile_ttl: float | None) -> float | None:
    """Ollama sets the model's keep-alive on every request; an absent keep_alive means the server
    default, which for us is the model's profile ttl. Seconds, or None for forever."""
    return profile_ttl if value is None else parse_duration(value)


def sampling_from(options: Options | None, logprobs: bool = False, top_logprobs: int = 0) -> SamplingParams:
    o = options or Options()
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    return SamplingParams(
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        repetition_penalty=o.repeat_penalty,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        seed=o.seed if o.seed is not None and o.seed >= 0 else None,  # Ollama: -1 = random
        max_tokens=max_tokens,
        stop=tuple(o.stop or ()),
        logprobs=logprobs or top_logprobs > 0,
        top_logprobs=top_logprobs,
    )


def response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt:
        return {"type": "json_schema", "schema": fmt}
    return None


def enable_thinking(think: bool | str | None) -> bool | None:
    """true / "low" / "medium" / "high" turn thinking on, false off, absent leaves the template's default."""
    return None if think is None else think is not False


def tool_specs(tools: Sequence[Tool] | None) -> tuple[ToolSpec, ...]:
    return tuple(
        ToolSpec(t.function.name, t.function.description, t.function.parameters) for t in tools or ()
    )


def _message(m: ChatMessage, index: int) -> Message:
    calls = tuple(
        ToolCall(
            id=c.id or f"call_{index}_{i}",
            name=c.function.name,
            arguments=json.dumps(c.function.arguments, ensure_ascii=False, separators=(",", ":")),
        )
        for i, c in enumerate(m.tool_calls or ())
    )
    return Message(
        role=m.role,
        content=m.content or "",
        tool_calls=calls,
        tool_call_id=m.tool_call_id,
        name=m.tool_name if m.role == "tool" else None,
        reasoning=m.thinking or None,
    )


def messages_from(messages: Sequence[ChatMessage]) -> tuple[Message, ...]:
    out = tuple(_message(m, i) for i, m in enumerate(messages))
    if out and out[0].role == "tool":
        raise RequestError(
            "messages[0]: a tool result must follow an assistant tool call", "messages[0].role"
        )
    return out


def chat_request(req: ChatRequest) -> GenerationRequest:
    return GenerationRequest(
        messages=messages_from(req.messages),
        tools=tool_specs(req.tools),
        sampling=sampling_from(req.options, req.logprobs, req.top_logprobs),
        response_format=response_format(req.format),
        enable_thinking=enable_thinking(req.think),
    )


def generate_request(req: GenerateRequest) -> GenerationRequest:
    """`suffix` -> fill-in-the-middle around the prompt; `raw` -> the prompt as is; otherwise the
    prompt (and `system`) go through the model's chat template, as Ollama's templates do."""
    common = {
        "sampling": sampling_from(req.options, req.logprobs, req.top_logprobs),
        "response_format": response_format(req.format),
        "enable_thinking": enable_thinking(req.think),
    }
    prompt = req.prompt or ""
    if req.suffix:
        return GenerationRequest(prompt=prompt, suffix=req.suffix, **common)
    if req.raw:
        return GenerationRequest(prompt=prompt, **common)
    messages = ((Message("system", req.system),) if req.system else ()) + (Message("user", prompt),)
    return GenerationRequest(messages=messages, **common)


# ---- responses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """Nanoseconds, as Ollama reports them."""

    total_ns: int
    load_ns: int
    prompt_ns: int
    eval_ns: int

    @classmethod
    def from_seconds(cls, total: float, load: float, prompt: float, evaluation: float) -> Timings:
        def ns(s: float) -> int:
            return max(1, int(s * 1e9))  # clients divide by these: never 0

        return cls(ns(total), ns(load) if load > 0 else 0, ns(prompt), ns(evaluation))


def created_at(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


def rfc3339(timestamp: float) -> str:
    return created_at(datetime.fromtimestamp(timestamp, UTC))


def done_reason(finished: Finished) -> str:
    """Ollama knows "stop" and "length" (tool calls end with "stop")."""
    return "length" if finished.reason in ("length", "context_overflow") else "stop"


def done_fields(finished: Finished, timings: Timings) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": done_reason(finished),
        "total_duration": timings.total_ns,
        "load_duration": timings.load_ns,
        "prompt_eval_count": finished.usage.prompt_tokens,
        "prompt_eval_duration": timings.prompt_ns,
        "eval_count": finished.usage.completion_tokens,
        "eval_duration": timings.eval_ns,
    }


def tool_call_wire(call: ToolCall, index: int) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):  # engines only emit objects; guard the wire contract anyway
        arguments = {"arguments": call.arguments}
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments}}


def logprobs_wire(logprobs: Iterable[TokenLogprob]) -> list[dict[str, Any]]:
    out = []
    for lp in logprobs:
        item: dict[str, Any] = {"token": lp.token, "logprob": lp.logprob}
        if lp.top:
            item["top_logprobs"] = [{"token": t, "logprob": p} for t, p in lp.top]
        out.append(item)
    return out


def _message_body(text: str, thinking: str, calls: Sequence[ToolCallEvent]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = [tool_call_wire(c.call, c.index) for c in calls]
    return message


def chat_chunk(
    model: str,
    text: str = "",
    thinking: str = "",
    calls: Sequence[ToolCallEvent] = (),
    logprobs: Sequence[TokenLogprob] = (),
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "created_at": created_at(),
        "message": _message_body(text, thinking, calls),
        "done": False,
    }
    if logprobs:
        body["logprobs"] = logprobs_wire(logprobs)
    return body


def generate_chunk(
    model: str, text: str = "", thinking: str = "", logprobs: Sequence[TokenLogprob] = ()
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "created_at": created_at(), "response": text, "done": False}
    if thinking:
        body["thinking"] = thinking
    if logprobs:
        body["logprobs"] = logprobs_wire(logprobs)
    return body


def event_chunk(dialect: str, model: str, event: Event) -> dict[str, Any] | None:
    """One streamed object for a content event ("chat" or "generate"); None for Finished."""
    chunk = chat_chunk if dialect == "chat" else generate_chunk
    if isinstance(event, TextDelta):
        if not event.text and not event.logprobs:
            return None
        return chunk(model, text=event.text, logprobs=event.logprobs)
    if isinstance(event, ReasoningDelta):
        return chunk(model, thinking=event.text)
    if isinstance(event, ToolCallEvent):
        if dialect != "chat":
            return None  # /api/generate offers no tools, so a call cannot be meant
        return chat_chunk(model, calls=(event,))
    return None


def final_chunk(dialect: str, model: str, finished: Finished, timings: Timings) -> dict[str, Any]:
    """The closing `done: true` object of a stream."""
    base = chat_chunk(model) if dialect == "chat" else generate_chunk(model)
    return {**base, **done_fields(finished, timings)}


def full_response(
    dialect: str,
    model: str,
    text: str,
    thinking: str,
    calls: Sequence[ToolCallEvent],
    logprobs: Sequence[TokenLogprob],
    finished: Finished,
    timings: Timings,
) -> dict[str, Any]:
    """A non-streaming response: everything in one `done: true` object."""
    if dialect == "chat":
        body = chat_chunk(model, text, thinking, calls, logprobs)
    else:
        body = generate_chunk(model, text, thinking, logprobs)
    return {**body, **done_fields(finished, timings)}


def lifecycle_response(dialect: str, model: str, reason: str) -> dict[str, Any]:
    """The answer to an empty request: Ollama's load ("load") or unload ("unload") call."""
    base = chat_chunk(model) if dialect == "chat" else generate_chunk(model)
    return {**base, "done": True, "done_reason": reason}


# ---- embeddings ----------------------------------------------------------------------------


def shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """Ollama's `dimensions`: keep the first N components and re-normalize."""
    if dimensions is None:
        return vectors
    out = []
    for v in vectors:
        if dimensions > len(v):
            raise RequestError(
                f"dimensions {dimensions} is larger than the model's embedding size {len(v)}", "dimensions"
            )
        cut = v[:dimensions]
        norm = sum(x * x for x in cut) ** 0.5
        out.append([x / norm for x in cut] if norm > 0 else cut)
    return out
