"""Decoded text -> events, the same for every engine.

raw text -> stop strings (cut at the first match, never emit half of one) -> reasoning split
(`<think>` blocks become ReasoningDelta) -> tool-call parsing (only when the request offered tools).
Token logprobs ride on the next TextDelta that carries text.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlx_serve.engines.text.reasoning import ReasoningFormat, ReasoningSplitter
from mlx_serve.engines.text.stops import StopMatcher
from mlx_serve.engines.text.toolcalls import ToolCallParser, ToolFormat
from mlx_serve.engines.types import Event, ReasoningDelta, TextDelta, TokenLogprob, ToolCallEvent


class OutputPipeline:
    def __init__(
        self,
        stops: Sequence[str] = (),
        reasoning: ReasoningFormat | None = None,
        tool_format: ToolFormat | None = None,
        prompt: str = "",
    ) -> None:
        self._stops = StopMatcher(stops)
        self._reasoning = ReasoningSplitter.for_prompt(reasoning, prompt) if reasoning else None
        self._tools = ToolCallParser(tool_format) if tool_format else None
        self._pending_logprobs: list[TokenLogprob] = []
        self.tool_calls = 0
        self.stopped = False

    def feed(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> list[Event]:
        """Events for one decoded chunk; sets `stopped` when a stop string completed."""
        self._pending_logprobs.extend(logprobs)
        if self.stopped:
            return []
        safe, self.stopped = self._stops.feed(text)
        return self._after_stops(safe, final=False)

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended generation, if one did."""
        return self._stops.matched

    def flush(self) -> list[Event]:
        """Everything still held back, at the end of generation."""
        tail = "" if self.stopped else self._stops.flush()
        return self._after_stops(tail, final=True)

    def _after_stops(self, text: str, final: bool) -> list[Event]:
        events: list[Event] = []
        if self._reasoning:
            split = self._reasoning.feed(text) if text else []
            if final:
                split += self._reasoning.flush()
        else:
            split = [TextDelta(text)] if text else []
        for event in split:
            if isinstance(event, TextDelta) and self._tools:
                events += self._tools.feed(event.text)
            else:
                events.append(event)
        if final and self._tools:
            events += self._tools.flush()
        return self._attach_logprobs(events, final)

    def _attach_logprobs(self, events: list[Event], final: bool) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if isinstance(event, ToolCallEvent):
                self.tool_calls += 1
            if isinstance(event, TextDelta) and event.text and self._pending_logprobs:
                event = TextDelta(event.text, tuple(self._pending_logprobs))
                self._pending_logprobs.clear()
            if isinstance(event, TextDelta | ReasoningDelta) and not event.text:
                continue
            out.append(event)
        if final:
            self._pending_logprobs.clear()
        return out
