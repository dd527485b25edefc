"""Splitting a model's reasoning (`<think>...</think>`) out of its decoded text stream.

Reasoning models wrap their chain of thought in tags; clients want it apart from the answer
(OpenAI `reasoning_content`, Anthropic thinking blocks, Ollama `thinking`). Tags are never
emitted, and only a tail that could be the start of a tag is held back between chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlx_serve.engines.text.stops import partial_suffix_len
from mlx_serve.engines.types import ReasoningDelta, TextDelta

ReasoningEvent = TextDelta | ReasoningDelta

# Tag pairs found in chat templates; the more specific ones first.
_TAG_PAIRS: tuple[tuple[str, str], ...] = (
    ("<seed:think>", "</seed:think>"),  # ByteDance Seed-OSS
    ("<longcat_think>", "</longcat_think>"),
    ("<|think:start|>", "<|think:end|>"),
    ("<mm:think>", "</mm:think>"),  # MiniMax-M3
    ("[THINK]", "[/THINK]"),  # Magistral / Ministral 3 reasoning
    ("<think>", "</think>"),  # DeepSeek-R1, Qwen3, QwQ, SmolLM3, MiniMax, GLM, ...
)
# A single- or double-quoted Jinja string literal.
_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model marks its reasoning.

    `opens_in_prompt` is a static guess from the template (the generation prompt ends with an open
    start tag, as in DeepSeek-R1 and QwQ). Templates switch this with `enable_thinking`, so engines
    should decide per request with `prompt_opens(rendered_prompt)` where they can.
    """

    start: str = "<think>"
    end: str = "</think>"
    opens_in_prompt: bool = False

    def prompt_opens(self, prompt: str) -> bool:
        """True if the rendered prompt ends inside an open reasoning block."""
        i = prompt.rfind(self.start)
        # Only whitespace may follow: a tag mentioned earlier (e.g. in a user turn) does not count.
        return i >= 0 and not prompt[i + len(self.start) :].strip()


def detect_reasoning(chat_template: str | None) -> ReasoningFormat | None:
    """Tell from a chat template whether the model thinks in tags, and whether the prompt opens them."""
    if not chat_template:
        return None
    for start, end in _TAG_PAIRS:
        if start in chat_template:
            return ReasoningFormat(start, end, _generation_prompt_opens(chat_template, start, end))
    return None


def _generation_prompt_opens(template: str, start: str, end: str) -> bool:
    # The generation prompt is rendered by the last `add_generation_prompt` block; a literal there
    # holding the start tag without the end tag leaves the block open (`'<think>\n'`), whereas
    # `'<think>\n\n</think>\n\n'` (Qwen3 with thinking off) does not.
    i = template.rfind("add_generation_prompt")
    if i < 0:
        return False
    for m in _LITERAL.finditer(template, i):
        literal = m.group(1) if m.group(1) is not None else m.group(2)
        if start in literal and end not in literal:
            return True
    return False


class ReasoningSplitter:
    """Incremental splitter: `feed(chunk)` -> TextDelta / ReasoningDelta events, `flush()` at the end.

    Whitespace right after a tag is dropped (models write `</think>\\n\\n` before the answer), so
    neither the reasoning nor the answer starts with blank lines. The output does not depend on
    how the text is chunked.
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", starts_inside: bool = False) -> None:
        if not start or not end:
            raise ValueError("reasoning tags must be non-empty")
        self._start, self._end = start, end
        self._inside = starts_inside
        self._buf = ""
        self._strip = starts_inside  # drop leading whitespace of the next segment
        # The prompt opened the block, yet some models repeat the start tag: swallow it once.
        self._maybe_repeat = starts_inside

    @classmethod
    def for_prompt(cls, fmt: ReasoningFormat, prompt: str) -> ReasoningSplitter:
        return cls(fmt.start, fmt.end, starts_inside=fmt.prompt_opens(prompt))

    @property
    def inside(self) -> bool:
        """True while the model is in a reasoning block."""
        return self._inside

    def feed(self, chunk: str) -> list[ReasoningEvent]:
        self._buf += chunk
        return self._drain(final=False)

    def flush(self) -> list[ReasoningEvent]:
        out = self._drain(final=True)
        self._buf = ""
        return out

    def _drain(self, final: bool) -> list[ReasoningEvent]:
        out: list[ReasoningEvent] = []
        while self._buf:
            if self._strip:
                stripped = self._buf.lstrip()
                if not stripped:
                    self._buf = ""  # keep stripping: the next chunk may hold more whitespace
                    break
                self._buf, self._strip = stripped, False
            if self._maybe_repeat:
                if self._buf.startswith(self._start):
                    self._buf, self._maybe_repeat, self._strip = self._buf[len(self._start) :], False, True
                    continue
                if self._start.startswith(self._buf) and not final:
                    break  # could still become the repeated tag
                self._maybe_repeat = False
            tag = self._end if self._inside else self._start
            i = self._buf.find(tag)
            if i >= 0:
                self._emit(out, self._buf[:i])
                self._buf = self._buf[i + len(tag) :]
                self._inside, self._strip = not self._inside, True
                continue
            cut = len(self._buf) - (0 if final else partial_suffix_len(self._buf, (tag,)))
            self._emit(out, self._buf[:cut])
            self._buf = self._buf[cut:]
            break
        return out

    def _emit(self, out: list[ReasoningEvent], text: str) -> None:
        if text:
            out.append(ReasoningDelta(text) if self._inside else TextDelta(text))
