"""OpenAI wire models for chat completions, completions and embeddings requests.

Strict types, every number range-checked, unknown fields ignored (logged at debug by apis.body).
Cross-field rules and the profile's count limits are checked after parsing by `check_chat` /
`check_completion`, so each failure still names its field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from ..body import WireModel
from ..errors import RequestError

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
OTHER_MEDIA_PARTS = frozenset({"input_audio", "audio", "file", "input_file"})
TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own per-request cap
INT64 = 2**63

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=-INT64, lt=INT64)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]


def _stop_list(value: Any) -> Any:
    """`stop` may be one string or a list of strings; normalized to a list."""
    if isinstance(value, str):
        return [value]
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError("must be a string or a list of strings")
    return value


Stop = Annotated[list[str] | None, BeforeValidator(_stop_list)]


def _check_stops(stops: list[str] | None) -> list[str] | None:
    if stops is not None and any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


def _content_text(value: Any, allow_refusal: bool = False) -> str | None:
    """Chat message content (a string, null, or a list of text parts) -> its text."""
    if value is None:
        return None
    return parts_text(value, TEXT_PARTS | {"refusal"} if allow_refusal else TEXT_PARTS)


def parts_text(value: Any, allowed: frozenset[str]) -> str:
    """A string, or a list of content parts of the `allowed` types, -> its text (refusal parts are
    skipped). Image and other media parts are rejected: the models served here are text-only."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise ValueError(f"content part {i} must be an object with a string 'type'")
        if kind in IMAGE_PARTS:
            raise ValueError(
                f"content part {i} is an image ({kind}); vision is not supported, the models here are text-only"
            )
        if kind in OTHER_MEDIA_PARTS:
            raise ValueError(f"content part {i} ({kind}) is not supported; only text parts are")
        if kind == "refusal" and "refusal" in allowed:
            continue
        if kind not in allowed:
            raise ValueError(
                f"content part {i} has unsupported type {kind!r}; use {' or '.join(sorted(allowed))}"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"content part {i} needs a string 'text'")
        texts.append(text)
    return "".join(texts)


# ---- tools -----------------------------------------------------------------------------------


def _function_name(v: str) -> str:
    if not FUNCTION_NAME.match(v):
        raise ValueError("must be 1-64 letters, digits, '_', '-' or '.'")
    return v


ValidName = Annotated[str, AfterValidator(_function_name)]  # function and schema names


class FunctionDef(WireModel):
    name: ValidName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: FunctionName


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return NamedToolChoice(type="function", function=FunctionName(name=name))
    raise ValueError(
        'must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'
    )


ToolChoice = Annotated[Any, BeforeValidator(_tool_choice)]


class CalledFunction(WireModel):
    name: str
    arguments: str


class AssistantToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


# ---- messages --------------------------------------------------------------------------------


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any, info: ValidationInfo) -> str | None:
        return _content_text(v, allow_refusal=info.data.get("role") == "assistant")

    @model_validator(mode="after")
    def _by_role(self) -> ChatMessage:
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise ValueError("an assistant message needs content or tool_calls")
        elif self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        return self


class StreamOptions(WireModel):
    include_usage: bool | None = None


class JsonSchemaFormat(WireModel):
    name: ValidName
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("type 'json_schema' needs a json_schema object with name and schema")
            if self.json_schema.schema_ is None:
                raise ValueError("json_schema.schema is required (the JSON Schema the output must match)")
        return self


# ---- requests --------------------------------------------------------------------------------


class SamplingFields(WireModel):
    """Fields chat completions and completions share (plus common local-server extensions)."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: int | None = None
    stop: Stop = None
    max_tokens: MaxTokens | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions many local clients send (llama.cpp server, vLLM, LM Studio)
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=5)] | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"only n=1 is supported (one choice per request), got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | None) -> list[str] | None:
        return _check_stops(v)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("must contain at least one message")
        return v


class CompletionRequest(SamplingFields):
    prompt: Any
    suffix: str | None = None
    echo: bool | None = None
    best_of: int | None = None
    logprobs: TopLogprobs | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError("token-id prompts are not supported; send the prompt as text")
        if isinstance(v, list):
            raise ValueError("must be one string (batched prompts are not supported)")
        raise ValueError("must be a string")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("echo=true is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"only best_of=1 is supported, got {v}")
        return v


class EmbeddingRequest(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> list[str]:
        texts = [v] if isinstance(v, str) else v
        if not isinstance(texts, list) or not texts:
            raise ValueError("must be a non-empty string or a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            if all(isinstance(t, int | list) for t in texts):
                raise ValueError("token-id input is not supported; send text")
            raise ValueError("must be a string or a list of strings")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        for i, text in enumerate(texts):
            if not text:
                raise ValueError(f"input[{i}] is empty")
        return texts

    @field_validator("dimensions")
    @classmethod
    def _dimensions(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("dimensions is not supported; embeddings have the model's own size")
        return v


# ---- checks that need the profile's limits or several fields ---------------------------------


def _check_common(body: SamplingFields, limits: Any, max_tokens_field: str) -> None:
    if body.stop is not None and len(body.stop) > limits.max_stop_sequences:
        raise RequestError(
            f"stop: at most {limits.max_stop_sequences} stop sequences are allowed, got {len(body.stop)}",
            "stop",
        )
    max_tokens = getattr(body, max_tokens_field)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise RequestError(
            f"{max_tokens_field}: {max_tokens} is over this server's limit of {limits.max_tokens}",
            max_tokens_field,
        )


def check_chat(body: ChatCompletionRequest, limits: Any) -> None:
    """Count limits from the profile and cross-field rules; RequestError naming the field."""
    if len(body.messages) > limits.max_messages:
        raise RequestError(
            f"messages: at most {limits.max_messages} messages are allowed, got {len(body.messages)}",
            "messages",
        )
    tools = body.tools or []
    if len(tools) > limits.max_tools:
        raise RequestError(f"tools: at most {limits.max_tools} tools are allowed, got {len(tools)}", "tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise RequestError("tools: function names must be unique", "tools")
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    _check_common(body, limits, field)
    choice = body.tool_choice
    if choice not in (None, "none", "auto") and not tools:
        raise RequestError("tool_choice: needs tools to choose from", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise RequestError(
            f"tool_choice: function {choice.function.name!r} is not among the offered tools", "tool_choice"
        )
    if body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs: requires logprobs to be true", "top_logprobs")


def check_completion(body: CompletionRequest, limits: Any) -> None:
    _check_common(body, limits, "max_tokens")
