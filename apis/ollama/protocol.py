"""Ollama wire models (requests). Strict types, no NaN; unknown fields and unknown options ignored.

Ollama's own server is Go and decodes loosely; we validate every field a client may send us and
name it in the 400. Numbers keep Ollama's meaning: `keep_alive` is a duration or seconds (0 =
unload after the request, negative = forever), `num_predict` -1 / -2 mean "no limit".
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from mlx_serve.apis.body import WireModel
from mlx_serve.profiles.units import parse_duration

MAX_NUM_CTX = 1 << 21  # the profile's own ceiling for context_length
MAX_SEED = 2**63 - 1


class Options(WireModel):
    """The runtime options we honour; load-time ones (num_gpu, num_thread, ...) are ignored."""

    temperature: Annotated[float, Field(ge=0, le=5)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    num_predict: int | None = None
    stop: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = None
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0, le=5)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    num_ctx: Annotated[int, Field(ge=1, le=MAX_NUM_CTX)] | None = None

    @field_validator("num_predict")
    @classmethod
    def _num_predict(cls, v: int | None) -> int | None:
        if v is not None and v < 1 and v not in (-1, -2):
            raise ValueError("must be a positive number of tokens, or -1 (no limit)")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


KeepAlive = int | float | str | None
Think = bool | Literal["low", "medium", "high"] | None
Format = dict[str, Any] | Literal["", "json"] | None
_SCHEMA_KEYS = ("type", "properties", "$ref", "anyOf", "oneOf", "allOf", "enum", "const")

# Union-typed fields are declared Any and checked by these validators, so a wrong value gets one
# plain message instead of one error per union member.


def _check_keep_alive(v: Any) -> KeepAlive:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError("must be a duration like '5m', a number of seconds, or -1 for forever")
    parse_duration(v)  # ValueError with a readable message
    return v


def _check_think(v: Any) -> Think:
    if v is None or isinstance(v, bool) or v in ("low", "medium", "high"):
        return v
    raise ValueError('must be true, false, "low", "medium" or "high"')


def _check_format(v: Any) -> Format:
    if v is None or v in ("", "json"):
        return v
    if not isinstance(v, dict):
        raise ValueError('must be "json" or a JSON schema object')
    if v and not any(k in v for k in _SCHEMA_KEYS):
        raise ValueError("is not a JSON schema (it has none of: " + ", ".join(_SCHEMA_KEYS) + ")")
    return v


def _no_images(v: Any) -> Any:
    if v:
        raise ValueError("images are not supported: no model served here has vision")
    return None


class _Generative(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    stream: bool = True
    format: Any = None
    options: Options | None = None
    keep_alive: Any = None
    think: Any = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] = 0

    check_format = field_validator("format")(_check_format)
    check_keep_alive = field_validator("keep_alive")(_check_keep_alive)
    check_think = field_validator("think")(_check_think)


class ToolCallFunction(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    arguments: dict[str, Any] = {}
    index: int | None = None

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments(cls, v: Any) -> Any:
        if isinstance(v, str):  # tolerate OpenAI-style JSON text, but it must still be an object
            try:
                v = json.loads(v) if v.strip() else {}
            except ValueError:
                raise ValueError("must be a JSON object") from None
        if v is None:
            return {}
        return v


class ToolCallWire(WireModel):
    id: str | None = None
    function: ToolCallFunction


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    images: Any = None
    tool_calls: list[ToolCallWire] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    check_images = field_validator("images")(_no_images)


class ToolFunction(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    parameters: dict[str, Any] = {}

    @field_validator("description", mode="before")
    @classmethod
    def _description(cls, v: Any) -> Any:
        return "" if v is None else v

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> Any:
        return {} if v is None else v


class Tool(WireModel):
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatRequest(_Generative):
    messages: list[ChatMessage] = []
    tools: list[Tool] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v: Any) -> Any:
        return [] if v is None else v


class GenerateRequest(_Generative):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None  # Go templates are not ours to run: ignored (logged)
    context: list[int] | None = None
    raw: bool = False
    images: Any = None

    check_images = field_validator("images")(_no_images)

    @field_validator("context")
    @classmethod
    def _context(cls, v: list[int] | None) -> list[int] | None:
        if v:
            raise ValueError(
                "token context from an earlier response is not supported; send the conversation to /api/chat"
            )
        return v


class EmbedRequest(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    input: Any = []
    truncate: bool = True
    dimensions: Annotated[int, Field(ge=1, le=65536)] | None = None
    options: Options | None = None
    keep_alive: Any = None

    check_keep_alive = field_validator("keep_alive")(_check_keep_alive)

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return v
        raise ValueError("must be a string or a list of strings")

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingsRequest(WireModel):
    """The legacy /api/embeddings: one prompt, one vector."""

    model: Annotated[str, Field(min_length=1, max_length=512)]
    prompt: str = ""
    options: Options | None = None
    keep_alive: Any = None

    check_keep_alive = field_validator("keep_alive")(_check_keep_alive)


class ShowRequest(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    name: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    verbose: bool = False

    @model_validator(mode="after")
    def _one_name(self) -> ShowRequest:
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self

    @property
    def model_name(self) -> str:
        return self.model or self.name or ""
