"""OpenAI Responses API input items -> the engines' messages.

`input` is a string or a list of items: messages, `function_call`, `function_call_output` and
`reasoning`. Each item is validated by its own strict model, a failure naming the item the way
OpenAI does (`input[2].call_id`); the items then become `Message`s following the conversation of
`previous_response_id`. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from mlx_serve.engines.types import Message, ToolCall

from ..body import WireModel, validate
from ..errors import RequestError
from .protocol import parts_text

SUPPORTED_ITEMS = "message, function_call, function_call_output, reasoning"


class MessageItem(WireModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Any

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any, info: ValidationInfo) -> str:
        assistant = info.data.get("role") == "assistant"
        return parts_text(
            v, frozenset({"input_text", "output_text", "refusal"} if assistant else {"input_text"})
        )


class FunctionCallItem(WireModel):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    arguments: str


class FunctionCallOutputItem(WireModel):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    output: Any

    @field_validator("output")
    @classmethod
    def _output(cls, v: Any) -> str:
        return parts_text(v, frozenset({"input_text"}))


class ReasoningItem(WireModel):
    type: Literal["reasoning"]
    summary: list[dict[str, Any]] = []
    content: list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        parts = self.content if self.content else self.summary
        return "".join(p["text"] for p in parts if isinstance(p.get("text"), str))


ITEM_MODELS: dict[str, type[WireModel]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}
Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


def parse_items(value: str | list[Any]) -> list[Item]:
    """`input` -> typed items; a failure names the item (`input[3].call_id`)."""
    if isinstance(value, str):
        return [MessageItem(role="user", content=value)]
    items: list[Item] = []
    for i, raw in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(raw, dict):
            raise RequestError(f"{where}: must be an object (an input item)", where)
        kind = raw.get("type", "message" if "role" in raw else None)
        model = ITEM_MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            hint = "; use previous_response_id" if kind == "item_reference" else ""
            raise RequestError(
                f"{where}.type: unsupported input item type {kind!r}; supported: {SUPPORTED_ITEMS}{hint}",
                f"{where}.type",
            )
        try:
            items.append(validate(model, raw))  # type: ignore[arg-type]
        except RequestError as exc:
            param = f"{where}.{exc.param}" if exc.param else where
            raise RequestError(
                f"{where}.{exc.message}" if exc.param else f"{where}: {exc.message}", param
            ) from None
    return items


def to_messages(items: list[Item], history: tuple[Message, ...]) -> tuple[Message, ...]:
    """Items -> messages after `history`. Consecutive function calls join the assistant message
    before them (chat templates expect one assistant turn with its tool calls); a reasoning item
    rides on the next assistant turn; a function_call_output must answer a known call_id."""
    names = {c.id: c.name for m in history for c in m.tool_calls}
    out: list[Message] = []
    reasoning: str | None = None
    for i, item in enumerate(items):
        if isinstance(item, ReasoningItem):
            reasoning = (reasoning or "") + item.text
        elif isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            extra = {"reasoning": reasoning} if role == "assistant" and reasoning else {}
            reasoning = None if extra else reasoning
            out.append(Message(role=role, content=item.content, **extra))  # type: ignore[arg-type]
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(item.call_id, item.name, item.arguments)
            names[item.call_id] = item.name
            if out and out[-1].role == "assistant":
                out[-1] = dataclasses.replace(out[-1], tool_calls=(*out[-1].tool_calls, call))
            else:
                out.append(Message(role="assistant", tool_calls=(call,), reasoning=reasoning))
                reasoning = None
        else:
            if item.call_id not in names:
                raise RequestError(
                    f"input[{i}].call_id: no function call found with call_id {item.call_id!r}",
                    f"input[{i}].call_id",
                )
            out.append(
                Message(role="tool", content=item.output, tool_call_id=item.call_id, name=names[item.call_id])
            )
    return tuple(out)
