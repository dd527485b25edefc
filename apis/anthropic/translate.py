"""Pure translation between the Anthropic Messages wire format and the internal types.

wire request -> GenerationRequest (`to_generation`); collected events -> message body
(`message_body`); live events -> Anthropic stream events (`StreamEncoder`). No I/O here.

Usage follows Anthropic's accounting: `input_tokens` excludes the prompt tokens served from the
engine's prefix cache, which are reported as `cache_read_input_tokens`; their sum is the prompt
size that /v1/messages/count_tokens reports.
"""

from __future__ import annotations

import json
import secrets
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
    ToolCall,
    ToolCallEvent,
    ToolSpec,
    Usage,
)

from .normalize import system_texts
from .protocol import (
    CountTokensBody,
    MessageParam,
    MessagesBody,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingAdaptive,
    ThinkingBlock,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)

StreamEvent = tuple[str, dict[str, Any]]  # (event type, data)
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "context_overflow": "model_context_window_exceeded",
}


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


# ---- request ---------------------------------------------------------------------------------


def to_generation(body: CountTokensBody) -> GenerationRequest:
    """The internal request; count_tokens and messages build it the same way, so counts are exact."""
    messages: list[Message] = []
    if system := system_texts(body.system or []):
        messages.append(Message("system", "\n\n".join(system)))
    # tool_use id -> tool name from the previous assistant turn (consecutive messages of one role
    # form one turn, as Anthropic merges them)
    previous_calls: dict[str, str] = {}
    for i, msg in enumerate(body.messages):
        if msg.role == "assistant":
            assistant = _assistant_message(msg, i)
            if i == 0 or body.messages[i - 1].role != "assistant":
                previous_calls = {}
            previous_calls.update((c.id, c.name) for c in assistant.tool_calls)
            messages.append(assistant)
        else:
            messages.extend(_user_messages(msg, i, previous_calls))
    if body.messages[-1].role == "assistant":
        raise RequestError(
            "the last message must have role 'user': continuing an assistant turn (prefill) is not supported",
            f"messages[{len(body.messages) - 1}].role",
        )
    tools, choice = _tools(body)
    thinking = body.thinking
    sampling = SamplingParams()
    if isinstance(body, MessagesBody):
        sampling = SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            max_tokens=body.max_tokens,
            stop=tuple(body.stop_sequences or ()),
        )
    return GenerationRequest(
        messages=tuple(messages),
        tools=tools,
        tool_choice=choice,
        sampling=sampling,
        enable_thinking=None
        if thinking is None
        else isinstance(thinking, ThinkingEnabled | ThinkingAdaptive),
    )


def _assistant_message(msg: MessageParam, i: int) -> Message:
    text, reasoning, calls = [], [], []
    for j, block in enumerate(msg.content):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append(ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
        elif not isinstance(block, RedactedThinkingBlock):  # redacted reasoning is opaque: dropped
            raise RequestError(
                f"{block.type} blocks are not allowed in assistant messages", f"messages[{i}].content[{j}]"
            )
    return Message("assistant", "".join(text), tuple(calls), reasoning="".join(reasoning) or None)


def _user_messages(msg: MessageParam, i: int, previous_calls: dict[str, str]) -> list[Message]:
    """Tool results become role="tool" messages, in order; text around them stays a user message."""
    out: list[Message] = []
    text: list[str] = []
    for j, block in enumerate(msg.content):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if block.tool_use_id not in previous_calls:
                raise RequestError(
                    f"tool_result for unknown tool_use_id {block.tool_use_id!r}: each tool_result must answer "
                    "a tool_use block of the previous assistant message",
                    f"messages[{i}].content[{j}].tool_use_id",
                )
            if text:
                out.append(Message("user", "\n".join(text)))
                text = []
            content = "\n".join(b.text for b in block.content or () if isinstance(b, TextBlock))
            if block.is_error:
                content = f"Error: {content}"
            out.append(
                Message(
                    "tool", content, tool_call_id=block.tool_use_id, name=previous_calls[block.tool_use_id]
                )
            )
        else:
            raise RequestError(
                f"{block.type} blocks are not allowed in user messages", f"messages[{i}].content[{j}]"
            )
    if text or not out:
        out.append(Message("user", "\n".join(text)))
    return out


def _tools(body: CountTokensBody) -> tuple[tuple[ToolSpec, ...], str | dict[str, Any] | None]:
    choice = body.tool_choice
    if not body.tools or isinstance(choice, ToolChoiceNone):
        # tool_choice none: the model is not told about tools, so it cannot call one
        return (), "none" if choice is not None else None
    tools = tuple(ToolSpec(t.name, t.description, t.input_schema) for t in body.tools)
    if isinstance(choice, ToolChoiceAny):
        return tools, "required"
    if isinstance(choice, ToolChoiceTool):
        return tools, {"name": choice.name}
    return tools, "auto" if choice is not None else None


# ---- response --------------------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, int]:
    cached = min(usage.cached_prompt_tokens, usage.prompt_tokens)
    return {
        "input_tokens": usage.prompt_tokens - cached,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def stop_reason(finished: Finished) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). Needs the engine to say which stop string ended generation."""
    matched = getattr(finished, "stop_sequence", None)
    if finished.reason == "stop" and matched:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finished.reason, "end_turn"), None


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call.arguments)}


def tool_input(arguments: str) -> dict[str, Any]:
    """Engines hand over arguments as JSON text; Anthropic wants an object."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


class MessageAssembler:
    """Engine events -> the non-streaming message body, blocks in the order the model produced them."""

    def __init__(self, model: str, message_id: str) -> None:
        self.model = model
        self.message_id = message_id
        self.content: list[dict[str, Any]] = []
        self.finished: Finished | None = None

    def feed(self, event: Event) -> None:
        last = self.content[-1] if self.content else {}
        if isinstance(event, TextDelta) and event.text:
            if last.get("type") == "text":
                last["text"] += event.text
            else:
                self.content.append({"type": "text", "text": event.text})
        elif isinstance(event, ReasoningDelta) and event.text:
            if last.get("type") == "thinking":
                last["thinking"] += event.text
            else:
                self.content.append({"type": "thinking", "thinking": event.text, "signature": ""})
        elif isinstance(event, ToolCallEvent):
            self.content.append(tool_use_block(event.call))
        elif isinstance(event, Finished):
            self.finished = event

    def body(self) -> dict[str, Any]:
        assert self.finished is not None, "engines always end with Finished"
        reason, sequence = stop_reason(self.finished)
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage_body(self.finished.usage),
        }


def error_event(kind: str, message: str) -> StreamEvent:
    return "error", {"type": "error", "error": {"type": kind, "message": message}}


class StreamEncoder:
    """Engine events -> Anthropic stream events, one content block open at a time."""

    def __init__(self, model: str, message_id: str) -> None:
        self.model = model
        self.message_id = message_id
        self._index = -1
        self._open: str | None = None  # type of the open block

    def start(self) -> list[StreamEvent]:
        # Engines report prompt usage only at the end; the final counts ride on message_delta.
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]

    def feed(self, event: Event) -> list[StreamEvent]:
        if isinstance(event, TextDelta):
            return self._delta("text", {"type": "text_delta", "text": event.text}) if event.text else []
        if isinstance(event, ReasoningDelta):
            delta = {"type": "thinking_delta", "thinking": event.text}
            return self._delta("thinking", delta) if event.text else []
        if isinstance(event, ToolCallEvent):
            return self._tool_use(event.call)
        if isinstance(event, Finished):
            return self.finish(event)
        return []

    def finish(self, finished: Finished) -> list[StreamEvent]:
        out = self._close()
        if finished.reason in ("error", "cancelled"):
            return [*out, error_event("api_error", finished.error or f"generation {finished.reason}")]
        reason, sequence = stop_reason(finished)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        out.append(
            ("message_delta", {"type": "message_delta", "delta": delta, "usage": usage_body(finished.usage)})
        )
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    def _delta(self, kind: str, delta: dict[str, Any]) -> list[StreamEvent]:
        out = []
        if self._open != kind:
            out = self._close()
            start: dict[str, Any] = {"type": "text", "text": ""}
            if kind == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
            out.append(self._start(kind, start))
        out.append(
            ("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})
        )
        return out

    def _tool_use(self, call: ToolCall) -> list[StreamEvent]:
        out = self._close()
        out.append(
            self._start("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        )
        partial = json.dumps(tool_input(call.arguments), ensure_ascii=False)
        delta = {"type": "input_json_delta", "partial_json": partial}
        out.append(
            ("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})
        )
        out += self._close()
        return out

    def _start(self, kind: str, block: dict[str, Any]) -> StreamEvent:
        self._index += 1
        self._open = kind
        return "content_block_start", {
            "type": "content_block_start",
            "index": self._index,
            "content_block": block,
        }

    def _close(self) -> list[StreamEvent]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._index})]


def encode_sse(events: list[StreamEvent]) -> bytes:
    return b"".join(
        f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
        for kind, data in events
    )
