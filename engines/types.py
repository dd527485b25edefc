"""Internal request and event types shared by every engine and every API dialect.

Dialects translate their wire formats to and from these types; they never talk to each other.
All types are frozen dataclasses: a request or event is a value, never mutated after creation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error", "context_overflow"]
Capability = Literal["chat", "completion", "fim", "tools", "embedding", "vision"]


@dataclass(frozen=True)
class ToolCall:
    """A structured call the model asked for; `arguments` is a JSON object encoded as a string."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolSpec:
    """A function the client offers the model (JSON-schema parameters)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; None means "use the model's profile default, else the engine default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: either chat `messages` (templated by the engine) or a raw `prompt`.

    `suffix` asks for fill-in-the-middle around `prompt`. `response_format` is None, {"type":
    "json_object"} or {"type": "json_schema", "schema": {...}}. `enable_thinking` is passed to chat
    templates that support it; None leaves the template's default.
    """

    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    suffix: str | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    response_format: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of messages or prompt")


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    # When the engine made it (time.monotonic): fast streams reach the server in batches
    # (worker.Handoff), so metrics time tokens by this, not by their arrival. Also below.
    at: float = field(default_factory=time.monotonic, compare=False, repr=False)


@dataclass(frozen=True)
class ReasoningDelta:
    text: str
    at: float = field(default_factory=time.monotonic, compare=False, repr=False)


@dataclass(frozen=True)
class ToolCallEvent:
    call: ToolCall
    index: int = 0
    at: float = field(default_factory=time.monotonic, compare=False, repr=False)


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage
    error: str | None = None
    stop_sequence: str | None = None  # which of the request's stop strings ended it, if one did


Event = TextDelta | ReasoningDelta | ToolCallEvent | Finished


@dataclass(frozen=True)
class EngineInfo:
    context_length: int
    capabilities: frozenset[Capability]
    engine: str
    architecture: str = "unknown"
    parameter_count: int | None = None
    quantization: str | None = None
    embedding_length: int | None = None
    fim_tokens: tuple[str, str, str] | None = None  # (prefix, suffix, middle)
    chat_template: str | None = None
