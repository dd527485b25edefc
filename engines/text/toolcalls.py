"""Tool-call extraction from a model's decoded text stream, for the common open-model formats.

- HERMES (Qwen2.5/Qwen3, Hermes 2/3, SmolLM3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  possibly several in a row.
- LLAMA3_JSON (Llama 3.1/3.2/3.3): the whole reply is `{"name": ..., "parameters": {...}}`, optionally
  after `<|python_tag|>`, several separated by `;`. There is no start marker, so this is only a call
  when the whole output is one; such output is held back until the end.
- MISTRAL: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Nemo, Small 3.1) or
  `[TOOL_CALLS]name[ARGS]{...}` / `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` (Small 3.2, Devstral,
  Ministral 3), one marker per call. Mistral has no end marker: a call ends where its JSON ends.

Nothing is ever lost: a call that is unterminated or not valid JSON comes out as plain text.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from enum import StrEnum
from typing import Any

from mlx_serve.engines.text.stops import partial_suffix_len
from mlx_serve.engines.types import TextDelta, ToolCall, ToolCallEvent

ToolEvent = TextDelta | ToolCallEvent


class ToolFormat(StrEnum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"
    MISTRAL = "mistral"


_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
_MISTRAL_START = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_HEADER = re.compile(r"\s*([\w.\-]+)\s*(?:\[CALL_ID\]\s*[\w\-]*\s*)?\[ARGS\]\s*")
_MISTRAL_HEADER_CHARS = re.compile(r"[\w.\-\[\]\s]*")  # what a header can hold before [ARGS]
_DECODER = json.JSONDecoder()
_CLOSERS = ("]", "}", '"')
_XML_MARKERS = ("<function=", "<arg_key>", "<parameter=", "<invoke name=")
_NAME_AFTER_TAG = re.compile(r"<tool_call>['\"]\s*[+~]")  # '<tool_call>' + tc.name (GLM, Ling)

# Model-name hints used only when there is no chat template (e.g. a bare GGUF). Qwen3-Coder and
# Qwen3.5 write XML inside <tool_call>, which these parsers do not read.
_HINTS: tuple[tuple[re.Pattern[str], ToolFormat | None], ...] = (
    (re.compile(r"qwen3[\W_]*coder|qwen3\.5"), None),
    (re.compile(r"mistral|mixtral|ministral|devstral|magistral|codestral"), ToolFormat.MISTRAL),
    (re.compile(r"qwen|hermes|smollm3"), ToolFormat.HERMES),
    (re.compile(r"llama[\W_]*3"), ToolFormat.LLAMA3_JSON),
)


def detect_tool_format(chat_template: str | None, model_hint: str = "") -> ToolFormat | None:
    """The tool-call format a model writes, from its chat template, else from its name."""
    if chat_template:
        # The template is authoritative: it shows how past calls are rendered back to the model.
        if _MISTRAL_START in chat_template:
            return ToolFormat.MISTRAL
        if any(m in chat_template for m in _XML_MARKERS) or _NAME_AFTER_TAG.search(chat_template):
            return None  # XML-style calls (Qwen3-Coder/3.5, GLM, MiniMax, functionary): not parsed here
        if _HERMES_START in chat_template:
            return ToolFormat.HERMES
        if _PYTHON_TAG in chat_template or '"parameters": dictionary' in chat_template:
            return ToolFormat.LLAMA3_JSON
        return None
    hint = model_hint.lower()
    for pattern, fmt in _HINTS:
        if pattern.search(hint):
            return fmt
    return None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _call_from_obj(obj: Any) -> tuple[str, str] | None:
    """(name, compact JSON arguments) from one decoded call object, or None if it is not a call."""
    if isinstance(obj, dict) and "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]  # OpenAI-shaped {"type": "function", "function": {...}}
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments")
    if args is None:
        args = obj.get("parameters", {})
    if isinstance(args, str):  # some models (and templates) encode the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False, separators=(",", ":"))


def _calls_from_value(value: Any) -> list[tuple[str, str]] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_obj(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _parse_call_sequence(text: str) -> list[tuple[str, str]] | None:
    """Calls from JSON values separated by whitespace or `;` (each may follow `<|python_tag|>`)."""
    calls: list[tuple[str, str]] = []
    pos, n = 0, len(text)
    while True:
        while pos < n and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
        if pos == n:
            return calls or None
        if text.startswith(_PYTHON_TAG, pos):
            pos += len(_PYTHON_TAG)
            continue
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        found = _calls_from_value(value)
        if found is None:
            return None
        calls.extend(found)


def _parse_hermes_body(body: str) -> list[tuple[str, str]] | None:
    calls = _parse_call_sequence(body)
    if calls is None:
        # Hermes 2 Pro's documented output is a Python dict repr ({'name': ...}); literal_eval is safe.
        try:
            calls = _calls_from_value(ast.literal_eval(body.strip()))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    return calls


def _parse_mistral_body(body: str, final: bool) -> tuple[list[tuple[str, str]] | None, int] | None:
    """(calls or None if not a call, chars consumed) once the call after `[TOOL_CALLS]` is complete;
    None while it may still be growing."""
    pos = len(body) - len(body.lstrip())
    try:
        if body.startswith(("[", "{"), pos):
            value, end = _DECODER.raw_decode(body, pos)
            return _calls_from_value(value), end
        header = _MISTRAL_HEADER.match(body)
        if header is None:
            if final or not _MISTRAL_HEADER_CHARS.fullmatch(body):
                # Not a call: give back text only up to a later (possibly partial) marker, so a real
                # call after it is still found however the text was chunked.
                nxt = body.find(_MISTRAL_START)
                return None, nxt if nxt >= 0 else len(body) - partial_suffix_len(body, (_MISTRAL_START,))
            return None
        args, end = _DECODER.raw_decode(body, header.end())
        call = _call_from_obj({"name": header.group(1), "arguments": args})
        return (None if call is None else [call]), end
    except json.JSONDecodeError:
        return (None, len(body)) if final else None


class ToolCallParser:
    """Incremental parser: `feed(chunk)` -> TextDelta / ToolCallEvent events, `flush()` at the end.

    Ordinary text streams through as it arrives; only a tail that may start a call marker is held.
    Whitespace that separates nothing but calls (e.g. the newline between two `</tool_call>` and
    `<tool_call>`) is dropped, so a reply made only of calls has no text. Output does not depend on
    chunking, except for the random call ids.
    """

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self._buf = ""
        self._in_call = False
        self._at_start = True  # only whitespace since the start of output or the last call
        self._index = 0
        self._llama_mode = "undecided"  # -> "text" or "calls" once the first character is known
        self._marker = _HERMES_START if fmt is ToolFormat.HERMES else _MISTRAL_START

    @property
    def calls_emitted(self) -> int:
        return self._index

    def feed(self, chunk: str) -> list[ToolEvent]:
        self._buf += chunk
        if self.fmt is ToolFormat.LLAMA3_JSON:
            return self._drain_llama(final=False)
        # A Mistral call's JSON can only complete on a closing bracket or quote; skip re-parsing otherwise.
        return self._drain_marked(final=False, may_close=any(c in chunk for c in _CLOSERS))

    def flush(self) -> list[ToolEvent]:
        if self.fmt is ToolFormat.LLAMA3_JSON:
            out = self._drain_llama(final=True)
        else:
            out = self._drain_marked(final=True, may_close=True)
        self._buf = ""
        return out

    def _emit_calls(self, out: list[ToolEvent], calls: list[tuple[str, str]]) -> None:
        for name, arguments in calls:
            out.append(ToolCallEvent(ToolCall(id=new_call_id(), name=name, arguments=arguments), self._index))
            self._index += 1
        self._at_start = True

    def _emit_text(self, out: list[ToolEvent], text: str) -> None:
        if text:
            out.append(TextDelta(text))
            self._at_start = False

    def _drain_marked(self, final: bool, may_close: bool) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        while True:
            if not self._in_call:
                i = self._buf.find(self._marker)
                held = 0 if final or i >= 0 else partial_suffix_len(self._buf, (self._marker,))
                cut = i if i >= 0 else len(self._buf) - held
                text = self._buf[:cut]
                if self._at_start and not text.strip():
                    # Whitespace before a call or after the last one is dropped; elsewhere it is
                    # held until we know (never lost when the output has no call at all).
                    if i < 0 and not final:
                        return out
                    if i < 0 and self._index == 0:
                        self._emit_text(out, text)
                else:
                    self._emit_text(out, text)
                if i < 0:
                    self._buf = self._buf[cut:]
                    return out
                self._buf, self._in_call = self._buf[i + len(self._marker) :], True
            result = self._close_call(final, may_close)
            if result is None:
                return out
            calls, consumed = result
            raw, self._buf, self._in_call = self._buf[:consumed], self._buf[consumed:], False
            if calls is None:
                self._emit_text(out, self._marker + raw)
            else:
                self._emit_calls(out, calls)

    def _close_call(self, final: bool, may_close: bool) -> tuple[list[tuple[str, str]] | None, int] | None:
        if self.fmt is ToolFormat.MISTRAL:
            return _parse_mistral_body(self._buf, final) if may_close else None
        end = self._buf.find(_HERMES_END)
        if end < 0:
            return (None, len(self._buf)) if final else None  # unterminated: plain text at the end
        calls = _parse_hermes_body(self._buf[:end])
        return calls, end + len(_HERMES_END)

    def _drain_llama(self, final: bool) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        if self._llama_mode == "undecided":
            head = self._buf.lstrip()
            if head.startswith(("{", _PYTHON_TAG)):
                self._llama_mode = "calls"
            elif (not head or _PYTHON_TAG.startswith(head)) and not final:
                return out  # whitespace or a partial <|python_tag|>: not decided yet
            else:
                self._llama_mode = "text"
        if self._llama_mode == "text":
            self._emit_text(out, self._buf)
            self._buf = ""
        elif final:
            calls = _parse_call_sequence(self._buf)
            if calls is None:
                self._emit_text(out, self._buf)
            else:
                self._emit_calls(out, calls)
        return out
