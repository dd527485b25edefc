"""Prompts from requests: chat templates (sandboxed), tool prompts, fill-in-the-middle.

Chat templates come from model files, which are untrusted: they render in Jinja's immutable
sandbox (CVE-2024-34359 was a template reaching Python internals through llama-cpp-python),
bounded in time and size (engines/text/template_render.py), and `check_template` renders a probe
conversation at load time so a hostile or broken template fails the load with a clear reason
instead of failing every request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mlx_serve.engines.text.template_render import (
    TemplateError as TemplateError,  # re-exported: callers import it here
)
from mlx_serve.engines.text.template_render import render
from mlx_serve.engines.text.toolcalls import ToolFormat, detect_tool_format
from mlx_serve.engines.types import Message, ToolSpec

# (prefix, suffix, middle) token families, prefix-suffix-middle order.
FIM_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, Refact, SantaCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"),
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
)

HERMES_TOOL_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.source


def _tool_dicts(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _message_dict(message: Message, template_has_tools: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        calls = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in message.tool_calls
        ]
        if template_has_tools:
            out["tool_calls"] = calls
        else:  # the template cannot render calls: show them the way the injected prompt asked for
            rendered = "\n".join(
                f'<tool_call>\n{{"name": "{c.name}", "arguments": {c.arguments}}}\n</tool_call>'
                for c in message.tool_calls
            )
            out["content"] = (message.content + "\n" + rendered).strip()
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def render_chat(
    template: ChatTemplate,
    messages: Sequence[Message],
    tools: Sequence[ToolSpec] = (),
    enable_thinking: bool | None = None,
) -> str:
    """The prompt text for a conversation, ending with the assistant's generation prompt."""
    dicts = [_message_dict(m, template.supports_tools) for m in messages]
    if tools and not template.supports_tools:
        tool_prompt = HERMES_TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in _tool_dicts(tools)))
        if dicts and dicts[0]["role"] == "system":
            dicts[0] = {**dicts[0], "content": f"{dicts[0]['content']}\n\n{tool_prompt}"}
        else:
            dicts.insert(0, {"role": "system", "content": tool_prompt})
    context: dict[str, Any] = {
        "messages": dicts,
        "add_generation_prompt": True,
        "bos_token": template.bos_token,
        "eos_token": template.eos_token,
    }
    if tools and template.supports_tools:
        context["tools"] = _tool_dicts(tools)
    if enable_thinking is not None:
        context["enable_thinking"] = enable_thinking
    return render(template.source, context)


def check_template(template: ChatTemplate) -> None:
    """Compile and render a probe conversation; raises TemplateError for unsafe, broken or
    unbounded templates."""
    render_chat(template, (Message("system", "probe"), Message("user", "probe")))


def tool_format_for(
    template: ChatTemplate | None, model_hint: str, tools_requested: bool
) -> ToolFormat | None:
    """The format to parse tool calls in; Hermes when we injected our own tool prompt."""
    if not tools_requested:
        return None
    if template is None or not template.supports_tools:
        return ToolFormat.HERMES
    return detect_tool_format(template.source, model_hint) or ToolFormat.HERMES


def fim_tokens_from_vocab(tokens: Iterable[str]) -> tuple[str, str, str] | None:
    vocab = set(tokens)
    for family in FIM_FAMILIES:
        if all(tok in vocab for tok in family):
            return family
    return None


def build_fim_prompt(prefix: str, suffix: str, fim_tokens: tuple[str, str, str]) -> str:
    pre, suf, mid = fim_tokens
    return f"{pre}{prefix}{suf}{suffix}{mid}"
