"""Chat templates that never end or write without end (engines/text/template_render.py): the bounded
renderer stops them with a clear error, and in the real daemon such a template fails only its own
model's request (a 400 in each dialect's shape) or load (a clear reason), while every other model
keeps loading and serving and SIGTERM still ends the daemon promptly.

Renders run in a daemon thread joined with a timeout, so a renderer that hangs fails the test
instead of hanging the run.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_serve.engines.text.prompting import (
    ChatTemplate,
    TemplateError,
    check_template,
    render_chat,
)
from mlx_serve.engines.types import Message, ToolCall, ToolSpec

RENDER_LIMIT = 2.0  # template_render.RENDER_SECONDS
NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders normally, except for a message saying "boom": then it loops for ~10^10 steps.
BOOM_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] == 'boom' %}" + NESTED + "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
CONVERSATION = (Message("system", "You are terse."), Message("user", "Say hi"))


def finish_within(seconds: float, fn, *args) -> Any:
    """fn(*args) in a daemon thread; its result (or exception, re-raised) if it ends in time."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still rendering after {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def render(source: str, messages=CONVERSATION, tools=()) -> str:
    return render_chat(ChatTemplate(source, "<s>", "</s>"), messages, tools)


# ---- the bounded renderer --------------------------------------------------------------------

NEVER_ENDING = {
    "nested ranges": NESTED,
    "nested loops writing nothing visible": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% if false %}x{% endif %}"
        "{% endfor %}{% endfor %}"
    ),
    "loops over a string": (
        "{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
    ),
    "a set block buffering a long loop": (
        "{% set x %}{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}"
        "{% endfor %}{% endset %}{{ x }}"
    ),
    "a recursive loop": "{% for i in range(100000) recursive %}{{ loop(range(3)) if false }}"
    "{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "a macro looping": "{% macro spin() %}" + NESTED + "{% endmacro %}{{ spin() }}",
}


@pytest.mark.parametrize("source", NEVER_ENDING.values(), ids=NEVER_ENDING.keys())
def test_a_template_that_never_ends_raises_within_its_time_limit(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError, match="time limit"):
        finish_within(RENDER_LIMIT + 8, render, source)
    assert time.monotonic() - started < RENDER_LIMIT + 3


# Each would write or build at least ~100 MB unbounded; the limit here is ~1 MiB characters.
HUGE = {
    "a long loop of output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "string repetition": "{{ 'x' * 200000000 }}",
    "doubling with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(28) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}"
    ),
    "doubling in a set block": (
        "{% set ns = namespace(s='x') %}{% for i in range(28) %}{% set b %}{{ ns.s }}{{ ns.s }}"
        "{% endset %}{% set ns.s = b %}{% endfor %}{{ ns.s }}"
    ),
    "a list that doubles, written out": (
        "{% set ns = namespace(l=[]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}"
        "{% endfor %}{{ ns.l }}"
    ),
    "padding": "{{ 'x'|center(200000000) }}",
    "replace": "{% set s = 'x' * 20000 %}{{ s|replace('x', s) }}",
    "join": "{% set s = 'x' * 20000 %}{{ range(20000)|join(s) }}",
    "%-width": "{{ '%200000000d' % 1 }}",
    "format width": "{{ '{:>200000000}'.format(1) }}",
    "indent": "{{ ('x\n' * 20000)|indent(20000) }}",
    "a set block buffering a literal": (
        "{% set b %}{% for i in range(100000) %}{% for j in range(100) %}"
        + "y" * 10000
        + "{% endfor %}{% endfor %}{% endset %}{{ b }}"
    ),
    "squaring a number": (
        "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}"
        "{{ ns.n }}"
    ),
    "translate": "{{ ('x' * 20000).translate({120: 'y' * 20000}) }}",
    "a list of namespaces that doubles": (
        "{% set ns = namespace(l=[]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l, ns] %}"
        "{% endfor %}{{ ns.l }}"
    ),
}


@pytest.mark.parametrize("source", HUGE.values(), ids=HUGE.keys())
def test_a_template_with_huge_output_is_cut(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError, match="too large"):
        finish_within(RENDER_LIMIT + 8, render, source)
    assert time.monotonic() - started < RENDER_LIMIT


@pytest.mark.parametrize("source", ["{{ 1 + 'a' }}", "{{ messages[99]['content'] }}", "{{ 1 // 0 }}"])
def test_a_template_bug_is_a_template_error(source: str) -> None:
    """The template's own mistake is its model's 400, never a 500."""
    with pytest.raises(TemplateError, match="chat template error"):
        render(source)


def test_the_load_probe_fails_fast_on_a_never_ending_template() -> None:
    with pytest.raises(TemplateError, match="time limit"):
        finish_within(RENDER_LIMIT + 8, check_template, ChatTemplate(NESTED))


def _reference_render(source: str, messages, tools, monkeypatch: pytest.MonkeyPatch) -> str:
    """The renderer as it was before the bounds (Jinja's immutable sandbox, nothing else), given
    the context render_chat builds."""
    from mlx_serve.engines.text import prompting

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    with monkeypatch.context() as patch:
        patch.setattr(prompting, "render", lambda src, context: env.from_string(src).render(**context))
        return render_chat(ChatTemplate(source, "<s>", "</s>"), messages, tools)


# Real-world template features: loop.last/index, namespaces, reversed slices, macros, recursion,
# set blocks, tojson, filters, ~, %, str.format and string methods.
LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content']|trim %}{%- set rest = messages[1:] %}
{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' ~ system }}
{%- if tools is defined and tools %}{{- '\\nTools:\\n' }}{%- for t in tools %}{{- t|tojson(indent=4) ~ '\\n' }}{%- endfor %}{%- endif %}
{{- '<|eot_id|>' }}
{%- for m in rest %}
{%- if m.tool_calls is defined %}{%- for c in m.tool_calls %}{{- '{"name": "%s", "parameters": %s}' % (c.function.name, c.function.arguments|tojson) }}{%- endfor %}
{%- else %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']|trim + '<|eot_id|>' }}{%- endif %}
{%- if loop.last %}{{- '[last of %d]'|format(loop.length) }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""
QWEN_STYLE = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == "user" %}{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}
{%- endfor %}
{%- macro show(m, i) -%}<|im_start|>{{ m.role }}{{ ' (q)' if i == ns.last_query_index }}
{{ m.content.strip() }}<|im_end|>
{% endmacro -%}
{%- for message in messages %}{{- show(message, loop.index0) }}{%- endfor %}
{%- set tail %}{% for k, v in {'a': 1, 'b': [1, 2]}|dictsort %}{{ k }}={{ v|join(',') if v is iterable else v }};{% endfor %}{% endset %}
{{- tail|upper }}{{ '{}-{}'.format(messages|length, (messages|map(attribute='role')|list)|join('/')) }}
{%- for item in [[1, [2, 3]], 4] recursive %}{% if item is iterable %}[{{ loop(item) }}]{% else %}{{ item }}{% endif %}{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{%- endif %}"""
MISTRAL_STYLE = """{%- for message in messages %}{%- if message['role'] == 'user' %}{%- if loop.index0 % 2 == 0 %}{{- raise_exception('alternate') }}{%- endif %}
{{- '[INST] ' + message['content'].replace('  ', ' ') + ' [/INST]' }}{%- elif message['role'] == 'system' %}{{- message['content'][:5] ~ '|' ~ (message['content'] * 2)|length }}
{%- else %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}{{ ' '.join(['x', 'y']) }}{{ range(3)|list|sum }}{{ 2 ** 10 }}"""
TOOLS = (
    ToolSpec(
        "get_weather", "Weather for a city", {"type": "object", "properties": {"city": {"type": "string"}}}
    ),
)
WITH_CALLS = (
    Message("system", "You are terse."),
    Message("user", "Weather in Paris?"),
    Message("assistant", "", tool_calls=(ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
    Message("tool", "sunny", tool_call_id="c1"),
    Message("user", "Thanks  a lot"),
)


@pytest.mark.parametrize(
    "source,messages,tools",
    [
        (CHATML, CONVERSATION, ()),
        (LLAMA3_STYLE, WITH_CALLS, TOOLS),
        (QWEN_STYLE, WITH_CALLS, ()),
        (MISTRAL_STYLE, (Message("system", "be brief"), Message("user", "hi  there")), ()),
    ],
    ids=["chatml", "llama3-style", "qwen-style", "mistral-style"],
)
def test_real_templates_render_as_they_did_before_the_bounds(source, messages, tools, monkeypatch) -> None:
    assert render(source, messages, tools) == _reference_render(source, messages, tools, monkeypatch)


def test_a_long_real_conversation_renders_in_full() -> None:
    """The size limit grows with the input: a big conversation is not cut."""
    messages = [
        Message("user" if i % 2 == 0 else "assistant", f"turn {i} " + "y" * 20_000) for i in range(200)
    ]
    text = render(CHATML, messages)
    assert len(text) > 4_000_000 and text.endswith("<|im_start|>assistant\n")


# ---- the real daemon -------------------------------------------------------------------------


def gguf_model(path: Path, **extra: Any) -> dict[str, Any]:
    return {"source": str(path), "engine": "llama_cpp", "ttl": "forever", **extra}


def chat(daemon, model: str, content: str, timeout: float = 30) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 3,
        "temperature": 0,
    }
    return httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=timeout)


DIALECTS = {  # path, body, how the error body names its message
    "openai": (
        "/v1/chat/completions",
        {"model": "boom", "messages": [{"role": "user", "content": "boom"}], "max_tokens": 3},
        lambda body: body["error"]["message"] if body["error"]["type"] == "invalid_request_error" else "",
    ),
    "anthropic": (
        "/v1/messages",
        {"model": "boom", "messages": [{"role": "user", "content": "boom"}], "max_tokens": 3},
        lambda body: body["error"]["message"] if body["error"]["type"] == "invalid_request_error" else "",
    ),
    "ollama": (
        "/api/chat",
        {"model": "boom", "messages": [{"role": "user", "content": "boom"}], "stream": False},
        lambda body: body["error"],
    ),
}


class Call(threading.Thread):
    """An HTTP request in the background: .response and .seconds once it ends."""

    def __init__(self, fn, *args) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.response = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc
        self.seconds = time.monotonic() - started

    def result(self, timeout: float) -> httpx.Response:
        self.join(timeout)
        assert not self.is_alive(), f"no answer within {timeout}s"
        assert self.response is not None, self.error
        return self.response


def test_hostile_request_gets_a_clean_400_while_other_models_keep_serving(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon(
        {"good": gguf_model(tiny_gguf), "boom": gguf_model(tiny_gguf, chat_template=BOOM_TEMPLATE)}
    )
    assert chat(daemon, "good", "hello").status_code == 200
    assert chat(daemon, "boom", "hello").status_code == 200  # the template is fine until "boom"

    hostile = Call(chat, daemon, "boom", "boom", 60)
    hostile.start()
    time.sleep(0.3)  # rendering now
    started = time.monotonic()
    assert chat(daemon, "good", "hello").status_code == 200
    assert hostile.is_alive(), "the good model answered only after the hostile render ended"
    assert time.monotonic() - started < RENDER_LIMIT

    resp = hostile.result(RENDER_LIMIT + 15)
    assert resp.status_code == 400, resp.text
    assert "time limit" in resp.json()["error"]["message"]
    assert hostile.seconds < RENDER_LIMIT + 5

    calls = {
        name: Call(lambda p, b: httpx.post(daemon.url + p, json=b, timeout=60), path, body)
        for name, (path, body, _) in DIALECTS.items()
    }
    for call in calls.values():
        call.start()
    for name, call in calls.items():
        resp = call.result(3 * RENDER_LIMIT + 15)  # one engine thread: the three render in turn
        assert resp.status_code == 400, (name, resp.text)
        assert "chat template" in DIALECTS[name][2](resp.json()), (name, resp.text)
    assert chat(daemon, "boom", "hello").status_code == 200  # its model still serves
    assert chat(daemon, "good", "hello").status_code == 200


def test_hostile_template_fails_its_own_load_while_another_model_loads(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon(
        {"hang": gguf_model(tiny_gguf, chat_template=NESTED), "other": gguf_model(tiny_gguf)}
    )
    hostile = Call(chat, daemon, "hang", "hello", 60)
    hostile.start()
    time.sleep(0.5)  # its load is under way: the probe render loops
    resp = chat(daemon, "other", "hello", timeout=RENDER_LIMIT + 15)
    assert resp.status_code == 200
    assert hostile.is_alive(), "the other model's load waited for the hostile one"

    resp = hostile.result(RENDER_LIMIT + 15)
    assert resp.status_code == 503, resp.text
    message = resp.json()["error"]["message"]
    assert "unavailable" in message and "chat template" in message and "time limit" in message
    status = {m["id"]: m for m in daemon.get_json("/status")["models"]}
    assert status["hang"]["state"] == "failed" and "time limit" in status["hang"]["error"]
    assert status["other"]["state"] == "loaded"


@pytest.mark.parametrize("during", ["request", "load"])
def test_sigterm_ends_the_daemon_promptly_during_a_hostile_render(start_daemon, tiny_gguf, during) -> None:
    daemon = start_daemon(
        {
            "boom": gguf_model(tiny_gguf, chat_template=BOOM_TEMPLATE),
            "hang": gguf_model(tiny_gguf, chat_template=NESTED),
        }
    )
    if during == "request":
        assert chat(daemon, "boom", "hello").status_code == 200
        hostile = Call(chat, daemon, "boom", "boom", 60)
    else:
        hostile = Call(chat, daemon, "hang", "hello", 60)
    hostile.start()
    time.sleep(0.5)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        code = daemon.proc.wait(RENDER_LIMIT + 8)
    except Exception:  # noqa: BLE001 - reported below
        code = None
    assert code == 0, f"the daemon did not exit within {RENDER_LIMIT + 8}s of SIGTERM"
    assert time.monotonic() - started < RENDER_LIMIT + 6
