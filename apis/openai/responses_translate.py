"""OpenAI Responses API, request side: wire models, checks, request -> GenerationRequest.

`POST /v1/responses` takes `input` as a string or a list of items (messages, `function_call`,
`function_call_output`, `reasoning`); responses_items.py turns them into the engines' `Message`s,
with the conversation of `previous_response_id` in front. Strict types, every number
range-checked, unknown fields ignored (logged at debug by apis.body). Errors name the field the way
OpenAI does (`input[2].call_id`). Nothing here does I/O; the response side (engine events ->
Response object and stream events) and the route live in responses.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from mlx_serve.engines.types import GenerationRequest, Message, SamplingParams, ToolSpec

from ..body import WireModel
from ..errors import RequestError
from .protocol import (
    FUNCTION_NAME,
    FunctionDef,
    MaxTokens,
    Temperature,
    TopLogprobs,
    TopP,
)

LOGPROBS_INCLUDE = "message.output_text.logprobs"

# ---- wire models -----------------------------------------------------------------------------


class FunctionTool(FunctionDef):
    """A Responses function tool: name/description/parameters at the top level (no `function`)."""

    type: Literal["function"]


def _tool(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if isinstance(kind, str) and kind != "function":
        raise ValueError(f"tool type {kind!r} is not supported; only 'function' tools are")
    if isinstance(value, dict) and "function" in value and "name" not in value:
        raise ValueError(
            "Responses function tools take name, description and parameters at the top level "
            "(not under 'function' as in Chat Completions)"
        )
    return value


def _tool_choice(value: Any) -> Any:
    """'none' | 'auto' | 'required' | {"type": "function", "name": ...} -> str or the name dict.
    The Chat Completions shape {"type": "function", "function": {"name": ...}} is accepted too."""
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if name is None and isinstance(value.get("function"), dict):
            name = value["function"].get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "name": name}
    raise ValueError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}")


class TextFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self) -> TextFormat:
        if self.type == "json_schema":
            if self.name is None or not FUNCTION_NAME.match(self.name):
                raise ValueError("json_schema needs a name of 1-64 letters, digits, '_', '-' or '.'")
            if self.schema_ is None:
                raise ValueError("json_schema needs a schema (the JSON Schema the output must match)")
        return self

    def echo(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        out = {"type": "json_schema", "name": self.name, "schema": self.schema_, "strict": self.strict}
        return out | ({"description": self.description} if self.description is not None else {})


class TextParam(WireModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningParam(WireModel):
    """Accepted for compatibility; only effort 'none' has an effect (thinking off)."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Any
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: MaxTokens | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: TopLogprobs | None = None
    include: list[str] | None = None
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    store: bool | None = None
    stream: bool | None = None
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    background: bool | None = None
    conversation: Any = None
    truncation: Literal["auto", "disabled"] | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("is required: a string or a list of input items")
        if isinstance(v, str):
            if not v:
                raise ValueError("must not be empty")
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of input items")
        if not v:
            raise ValueError("must contain at least one item")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, v: Any) -> Any:
        return [_tool(t) for t in v] if isinstance(v, list) else v

    @field_validator("tool_choice")
    @classmethod
    def _choice(cls, v: Any) -> Any:
        return _tool_choice(v)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (
            len(v) > 16 or any(len(k) > 64 for k in v) or any(len(x) > 512 for x in v.values())
        ):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        return v

    @field_validator("background")
    @classmethod
    def _background(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("background responses are not supported; leave background unset or false")
        return v

    @field_validator("conversation")
    @classmethod
    def _conversation(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("conversations are not supported; use previous_response_id")
        return v

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ()) or bool(self.top_logprobs)

    @property
    def response_format(self) -> TextFormat | None:
        return self.text.format if self.text else None


# ---- checks and translation ------------------------------------------------------------------


def check_request(body: ResponsesRequest, limits: Any) -> None:
    """Profile limits and cross-field rules; RequestError naming the field."""
    tools = body.tools or []
    if len(tools) > limits.max_tools:
        raise RequestError(f"tools: at most {limits.max_tools} tools are allowed, got {len(tools)}", "tools")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise RequestError("tools: function names must be unique", "tools")
    choice = body.tool_choice
    if choice not in (None, "none", "auto") and not tools:
        raise RequestError("tool_choice: needs tools to choose from", "tool_choice")
    if isinstance(choice, dict) and choice["name"] not in names:
        raise RequestError(
            f"tool_choice: function {choice['name']!r} is not among the offered tools", "tool_choice"
        )
    if body.max_output_tokens is not None and body.max_output_tokens > limits.max_tokens:
        raise RequestError(
            f"max_output_tokens: {body.max_output_tokens} is over this server's limit of {limits.max_tokens}",
            "max_output_tokens",
        )
    if isinstance(body.input, list) and len(body.input) > limits.max_messages:
        raise RequestError(
            f"input: at most {limits.max_messages} items are allowed, got {len(body.input)}", "input"
        )


def _response_format(fmt: TextFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "schema": fmt.schema_}


def generation_request(body: ResponsesRequest, conversation: tuple[Message, ...]) -> GenerationRequest:
    """`conversation` is history + this input; `instructions` go first as the system message (they
    are not carried over from previous responses). tool_choice 'none' offers no tools; a named
    function offers only that one."""
    choice = body.tool_choice
    offered = list(body.tools or ())
    if choice == "none":
        offered = []
    elif isinstance(choice, dict):
        offered = [t for t in offered if t.name == choice["name"]]
        choice = {"type": "function", "function": {"name": choice["name"]}}
    tools = tuple(ToolSpec(t.name, t.description or "", t.parameters or {}) for t in offered)
    system = (Message(role="system", content=body.instructions),) if body.instructions else ()
    logprobs = body.wants_logprobs
    sampling = SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_output_tokens,
        logprobs=logprobs,
        top_logprobs=body.top_logprobs or 0,
    )
    effort = body.reasoning.effort if body.reasoning else None
    return GenerationRequest(
        messages=system + conversation,
        tools=tools,
        tool_choice=choice if tools else None,
        sampling=sampling,
        response_format=_response_format(body.response_format),
        enable_thinking=False if effort == "none" else None,
    )


def echo_fields(body: ResponsesRequest, defaults: Any = None) -> dict[str, Any]:
    """The request settings a Response object reports back (every field the spec requires).
    Unset sampling values report the model's profile default when it has one."""
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    tools = [
        {"type": "function", "name": t.name, "parameters": t.parameters, "strict": t.strict}
        | ({"description": t.description} if t.description is not None else {})
        for t in body.tools or ()
    ]
    fmt = body.response_format
    reasoning = body.reasoning
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": reasoning.effort, "summary": reasoning.summary} if reasoning else None,
        "store": body.store is not False,
        "temperature": body.temperature
        if body.temperature is not None
        else getattr(defaults, "temperature", None),
        "text": {"format": fmt.echo() if fmt else {"type": "text"}, "verbosity": "medium"},
        "tool_choice": choice,
        "tools": tools,
        "top_logprobs": body.top_logprobs or 0,
        "top_p": body.top_p if body.top_p is not None else getattr(defaults, "top_p", None),
        "truncation": body.truncation or "disabled",
    } | ({"user": body.user} if body.user is not None else {})
