"""Anthropic Messages API wire models (requests only; responses are built in translate.py).

Strict types, no NaN (WireModel); unknown fields such as `cache_control`, `citations`, `service_tier`
are ignored. Image and document blocks are rejected with a message that says why (no vision).
Count limits that depend on the profile are checked by `check_limits`, not by the models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from mlx_serve.apis.body import WireModel
from mlx_serve.apis.errors import RequestError


class TextBlock(WireModel):
    type: Literal["text"]
    text: str


def _text_to_blocks(value: Any) -> Any:
    """A bare string is shorthand for one text block; errors then point at the block list."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


SystemBlocks = Annotated[list[TextBlock], BeforeValidator(_text_to_blocks)]


class _Unsupported(WireModel):
    """A block type the API defines but this server cannot serve: a clear 400, not a tag error."""

    @model_validator(mode="before")
    @classmethod
    def _reject(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else "?"
        raise ValueError(f"{kind} content blocks are not supported: no model on this server accepts {kind}s")


class ImageBlock(_Unsupported):
    type: Literal["image"]


class DocumentBlock(_Unsupported):
    type: Literal["document"]


class ToolUseBlock(WireModel):
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=256)]
    input: dict[str, Any]


ToolResultContent = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(WireModel):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: Annotated[list[ToolResultContent], BeforeValidator(_text_to_blocks)] | None = None
    is_error: bool = False


class ThinkingBlock(WireModel):
    """Reasoning from a previous turn, sent back by the client; the signature is not checked."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(WireModel):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class MessageParam(WireModel):
    role: Literal["user", "assistant"]
    content: Annotated[list[ContentBlock], Field(min_length=1), BeforeValidator(_text_to_blocks)]


class ToolDef(WireModel):
    """A client tool. Anthropic's server tools (web search, bash, ...) carry other `type`s: rejected."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_.\-]+$")]
    description: str = ""
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _server_tools(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise ValueError(f"tool type {data.get('type')!r} is not supported; only client tools are")
        return data

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type", "object") != "object":
            raise ValueError("input_schema must describe an object (type 'object')")
        return value


class ToolChoiceAuto(WireModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(WireModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(WireModel):
    type: Literal["tool"]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(WireModel):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]


class ThinkingEnabled(WireModel):
    type: Literal["enabled"]
    budget_tokens: Annotated[int, Field(ge=1024)]


class ThinkingAdaptive(WireModel):
    type: Literal["adaptive"]


class ThinkingDisabled(WireModel):
    type: Literal["disabled"]


Thinking = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")]


class CountTokensBody(WireModel):
    """POST /v1/messages/count_tokens: everything that shapes the prompt."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: SystemBlocks | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> CountTokensBody:
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceTool) and choice.name not in {t.name for t in self.tools or ()}:
            raise ValueError(f"tool_choice names tool {choice.name!r}, which is not in tools")
        if isinstance(choice, ToolChoiceAny | ToolChoiceTool) and not self.tools:
            raise ValueError(f"tool_choice {choice.type!r} needs tools")
        return self


class MessagesBody(CountTokensBody):
    """POST /v1/messages."""

    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> MessagesBody:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self


def check_limits(body: CountTokensBody, limits: Any) -> None:
    """The profile's count limits (server.limits), each a 400 naming the field."""
    if len(body.messages) > limits.max_messages:
        raise RequestError(f"at most {limits.max_messages} messages are allowed", "messages")
    if body.tools and len(body.tools) > limits.max_tools:
        raise RequestError(f"at most {limits.max_tools} tools are allowed", "tools")
    if isinstance(body, MessagesBody):
        if body.stop_sequences and len(body.stop_sequences) > limits.max_stop_sequences:
            raise RequestError(
                f"at most {limits.max_stop_sequences} stop sequences are allowed", "stop_sequences"
            )
        if body.max_tokens > limits.max_tokens:
            raise RequestError(
                f"max_tokens {body.max_tokens} is over this server's limit of {limits.max_tokens}",
                "max_tokens",
            )
