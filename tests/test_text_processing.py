"""Stop strings, reasoning split and tool-call parsing on realistic model output.

Every case is fed whole, split in two at every character boundary, one character at a time and in
random pieces: engines decode token by token, so the result must never depend on the chunking.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mlx_serve.engines.text.reasoning import ReasoningFormat, ReasoningSplitter, detect_reasoning
from mlx_serve.engines.text.stops import StopMatcher
from mlx_serve.engines.text.toolcalls import ToolCallParser, ToolFormat, detect_tool_format
from mlx_serve.engines.types import ReasoningDelta, TextDelta, ToolCallEvent


def chunkings(text: str) -> Iterator[list[str]]:
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(text)
    for _ in range(25):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def normalize(events: list[Any]) -> list[tuple[Any, ...]]:
    """Merge adjacent deltas of one kind (chunking may split them) and drop random call ids."""
    out: list[tuple[Any, ...]] = []
    for ev in events:
        if isinstance(ev, ToolCallEvent):
            assert re.fullmatch(r"call_[0-9a-f]{24}", ev.call.id)
            out.append(("call", ev.call.name, ev.call.arguments, ev.index))
            continue
        kind = "text" if isinstance(ev, TextDelta) else "reasoning"
        assert ev.text, "empty deltas must not be emitted"
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + ev.text)
        else:
            out.append((kind, ev.text))
    return out


def run_events(make: Callable[[], Any], chunks: list[str]) -> list[Any]:
    proc = make()
    events: list[Any] = []
    for chunk in chunks:
        events += proc.feed(chunk)
    return events + proc.flush()


# ---------------------------------------------------------------- stops

STOP_CASES = [
    # (model output, stops, expected emitted text, stopped)
    (
        "The capital of France is Paris.<|im_end|>\n<|im_start|>user",
        ["<|im_end|>"],
        "The capital of France is Paris.",
        True,
    ),
    ("###\nInstruction: more", ["###"], "", True),  # stop at the very start
    ("xabcdy", ["abcd", "bc"], "xa", True),  # "bc" completes first, although "abcd" starts earlier
    ("xabcdy", ["bc", "abcd"], "xa", True),  # order of the stop list does not matter
    ("xabce", ["abcd"], "xabce", False),  # a candidate that fails is released, not lost
    ("aaab", ["aab"], "a", True),  # the stop starts inside a repeated prefix
    ("def f():\n    return 1\n\n\nclass A:", ["\nclass", "\ndef"], "def f():\n    return 1\n\n", True),
    ("Paris.\nUser: and Spain?", ["\nUser:", "\nAssistant:"], "Paris.", True),
    ("Tschüss 👋🏽 bis bald", ["👋🏽"], "Tschüss ", True),
    ("答案是四十二。\n\n用户：谢谢", ["用户：", "\n\nUser:"], "答案是四十二。\n\n", True),
    ("the end <", ["<|eot_id|>"], "the end <", False),  # partial stop at the end is flushed
    ("no stops configured", [], "no stops configured", False),
    ("empty stop ignored", [""], "empty stop ignored", False),
]


@pytest.mark.parametrize(("text", "stops", "expected", "stopped"), STOP_CASES)
def test_stop_matcher_is_chunking_independent(
    text: str, stops: list[str], expected: str, stopped: bool
) -> None:
    for chunks in chunkings(text):
        matcher = StopMatcher(stops)
        out, hit = "", False
        for chunk in chunks:
            piece, hit = matcher.feed(chunk)
            out += piece
            if hit:
                break
        out += matcher.flush()
        assert (out, hit) == (expected, stopped), chunks


def test_stop_matcher_holds_back_only_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["</s>", "<|eot_id|>"])
    assert matcher.feed("Hello <") == ("Hello ", False)  # "<" may start either stop
    assert matcher.feed("|eo") == ("", False)
    assert matcher.feed("x") == ("<|eox", False)  # no longer a stop prefix: released at once
    assert matcher.feed("</") == ("", False)
    assert matcher.feed("s") == ("", False)
    assert matcher.feed("> tail") == ("", True)  # the stop string itself is never emitted
    assert matcher.matched == "</s>"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_spanning_three_chunks() -> None:
    matcher = StopMatcher(["<|end_of_text|>"])
    assert matcher.feed("Done<|end") == ("Done", False)
    assert matcher.feed("_of_") == ("", False)
    assert matcher.feed("text|>ignored") == ("", True)


# ---------------------------------------------------------------- reasoning

QWEN3_THINK = (
    "<think>\nOkay, the user said hello. I should greet them back and offer help.\n</think>\n\n"
    "Hello! How can I help you today?"
)
R1_OPENED_BY_PROMPT = (  # DeepSeek-R1 template ends the prompt with "<｜Assistant｜><think>\n"
    "Okay, so I need to compare 9.11 and 9.9. 9.9 is 9.90, and 0.90 > 0.11.\n</think>\n\n"
    "**9.9** is larger than 9.11."
)
REASONING_CASES = [
    # (output, starts_inside, tags, expected normalized events)
    (
        QWEN3_THINK,
        False,
        ("<think>", "</think>"),
        [
            ("reasoning", "Okay, the user said hello. I should greet them back and offer help.\n"),
            ("text", "Hello! How can I help you today?"),
        ],
    ),
    (
        R1_OPENED_BY_PROMPT,
        True,
        ("<think>", "</think>"),
        [
            ("reasoning", "Okay, so I need to compare 9.11 and 9.9. 9.9 is 9.90, and 0.90 > 0.11.\n"),
            ("text", "**9.9** is larger than 9.11."),
        ],
    ),
    (  # R1 distills sometimes repeat the tag the prompt already opened
        "<think>\nHmm, 2 + 2 = 4.\n</think>\n\nThe answer is 4.",
        True,
        ("<think>", "</think>"),
        [("reasoning", "Hmm, 2 + 2 = 4.\n"), ("text", "The answer is 4.")],
    ),
    (  # thinking disabled: the prompt closed the block, the model just answers
        "Use a < b and <thin> tags, or <thinking>.",
        False,
        ("<think>", "</think>"),
        [("text", "Use a < b and <thin> tags, or <thinking>.")],
    ),
    (  # max_tokens hit while still thinking
        "<think>\nLet me count the r's in strawberry: s-t-r",
        False,
        ("<think>", "</think>"),
        [("reasoning", "Let me count the r's in strawberry: s-t-r")],
    ),
    (
        "<think>\n用户在问东京的天气。🌤️\n</think>\n\n东京今天晴。",
        False,
        ("<think>", "</think>"),
        [("reasoning", "用户在问东京的天气。🌤️\n"), ("text", "东京今天晴。")],
    ),
    (  # Magistral / Ministral 3 reasoning tags
        "[THINK]2 + 2 is 4.[/THINK]2 + 2 = 4.",
        False,
        ("[THINK]", "[/THINK]"),
        [("reasoning", "2 + 2 is 4."), ("text", "2 + 2 = 4.")],
    ),
    (  # interleaved thinking: a second block reopens reasoning
        "<think>plan</think>Step 1 done.<think>check</think>All done.",
        False,
        ("<think>", "</think>"),
        [("reasoning", "plan"), ("text", "Step 1 done."), ("reasoning", "check"), ("text", "All done.")],
    ),
]


@pytest.mark.parametrize(("text", "starts_inside", "tags", "expected"), REASONING_CASES)
def test_reasoning_splitter_is_chunking_independent(
    text: str, starts_inside: bool, tags: tuple[str, str], expected: list[tuple[str, str]]
) -> None:
    for chunks in chunkings(text):

        def make() -> ReasoningSplitter:
            return ReasoningSplitter(*tags, starts_inside=starts_inside)

        assert normalize(run_events(make, chunks)) == expected, chunks


def test_reasoning_holds_back_only_a_possible_tag() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("Hi <") == [TextDelta("Hi ")]
    assert splitter.feed("b>") == [TextDelta("<b>")]
    assert splitter.feed("<thi") == []
    assert splitter.feed("nk>Hm") == [ReasoningDelta("Hm")]
    assert splitter.inside


QWEN3_TEMPLATE_TAIL = """{%- for message in messages %}
    {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
QWQ_TEMPLATE_TAIL = """{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n<think>\\n' }}
{%- endif %}"""
R1_TEMPLATE_TAIL = (
    "{% set content = content.split('</think>')[-1] %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
MINISTRAL3_TEMPLATE = (
    "{{- '[THINK]' + block['thinking'] + '[/THINK]' }}{%- if add_generation_prompt %}{%- endif %}"
)
LLAMA31_TEMPLATE = """{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (QWEN3_TEMPLATE_TAIL, ReasoningFormat("<think>", "</think>", opens_in_prompt=False)),
        (QWQ_TEMPLATE_TAIL, ReasoningFormat("<think>", "</think>", opens_in_prompt=True)),
        (R1_TEMPLATE_TAIL, ReasoningFormat("<think>", "</think>", opens_in_prompt=True)),
        (MINISTRAL3_TEMPLATE, ReasoningFormat("[THINK]", "[/THINK]", opens_in_prompt=False)),
        (LLAMA31_TEMPLATE, None),
        (None, None),
    ],
)
def test_detect_reasoning(template: str | None, expected: ReasoningFormat | None) -> None:
    assert detect_reasoning(template) == expected


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
        ("<｜User｜>Hi<｜Assistant｜><think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # Qwen3, enable_thinking=False
        ("<|im_start|>user\nWhat does <think> mean?<|im_end|>\n<|im_start|>assistant\n", False),
    ],
)
def test_prompt_opens_decides_per_request(prompt: str, opens: bool) -> None:
    fmt = ReasoningFormat()
    assert fmt.prompt_opens(prompt) is opens
    splitter = ReasoningSplitter.for_prompt(fmt, prompt)
    expected = ("reasoning", "x") if opens else ("text", "x")
    assert normalize(splitter.feed("x") + splitter.flush()) == [expected]


# ---------------------------------------------------------------- tool calls


def call(name: str, arguments: str, index: int) -> tuple[str, str, str, int]:
    return ("call", name, arguments, index)


QWEN25_TWO_CALLS = """<tool_call>
{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}
</tool_call>
<tool_call>
{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", "date": "2024-10-01"}}
</tool_call>"""
BAD_HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'
UNTERMINATED_HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
TOOL_CASES = [
    # (format, model output, expected normalized events)
    (
        ToolFormat.HERMES,
        QWEN25_TWO_CALLS,
        [
            call("get_current_temperature", '{"location":"San Francisco, CA, USA"}', 0),
            call("get_temperature_date", '{"location":"San Francisco, CA, USA","date":"2024-10-01"}', 1),
        ],
    ),
    (
        ToolFormat.HERMES,
        'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n'
        "</tool_call>\nOne moment please.",
        [
            ("text", "Let me look that up.\n"),
            call("get_weather", '{"city":"東京"}', 0),
            ("text", "\nOne moment please."),
        ],
    ),
    (  # Hermes 2 Pro documents a Python-dict body
        ToolFormat.HERMES,
        "<tool_call>\n{'arguments': {'symbol': 'TSLA'}, 'name': 'get_stock_fundamentals'}\n</tool_call>",
        [call("get_stock_fundamentals", '{"symbol":"TSLA"}', 0)],
    ),
    (  # arguments given as a JSON string
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"mlx lm\\", \\"limit\\": 3}"}\n</tool_call>',
        [call("search", '{"query":"mlx lm","limit":3}', 0)],
    ),
    (ToolFormat.HERMES, BAD_HERMES, [("text", BAD_HERMES)]),  # malformed JSON falls back to text
    (ToolFormat.HERMES, UNTERMINATED_HERMES, [("text", UNTERMINATED_HERMES)]),
    (
        ToolFormat.HERMES,
        'Before <tool_call>{"name": "f", "arguments": "Paris"}</tool_call> after',  # not an object
        [("text", 'Before <tool_call>{"name": "f", "arguments": "Paris"}</tool_call> after')],
    ),
    (
        ToolFormat.HERMES,
        "Use the <tool> tag, not <tool_calling>.",
        [("text", "Use the <tool> tag, not <tool_calling>.")],
    ),
    (ToolFormat.HERMES, "\n\n", [("text", "\n\n")]),  # whitespace-only output is not lost
    (
        ToolFormat.LLAMA3_JSON,
        '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}',
        [call("get_current_conditions", '{"location":"San Francisco, CA","unit":"Fahrenheit"}', 0)],
    ),
    (
        ToolFormat.LLAMA3_JSON,
        '<|python_tag|>{"name": "get_current_weather", "parameters": {"location": "Menlo Park, CA"}}',
        [call("get_current_weather", '{"location":"Menlo Park, CA"}', 0)],
    ),
    (
        ToolFormat.LLAMA3_JSON,
        '\n{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "arguments": {"city": "London"}}',
        [call("get_weather", '{"city":"Paris"}', 0), call("get_weather", '{"city":"London"}', 1)],
    ),
    (
        ToolFormat.LLAMA3_JSON,
        'The weather in Paris is sunny. {"name": "get_weather", "parameters": {}}',
        [("text", 'The weather in Paris is sunny. {"name": "get_weather", "parameters": {}}')],
    ),
    (ToolFormat.LLAMA3_JSON, '{"answer": 42}', [("text", '{"answer": 42}')]),  # JSON, not a call
    (
        ToolFormat.LLAMA3_JSON,
        '{"name": "get_weather", "parameters": {"city": "Paris"}} I called the tool.',
        [("text", '{"name": "get_weather", "parameters": {"city": "Paris"}} I called the tool.')],
    ),
    (
        ToolFormat.LLAMA3_JSON,
        '<|python_tag|>brave_search.call(query="weather in Menlo Park")',
        [("text", '<|python_tag|>brave_search.call(query="weather in Menlo Park")')],
    ),
    (
        ToolFormat.MISTRAL,
        '[TOOL_CALLS][{"name": "retrieve_payment_status", "arguments": {"transaction_id": "T1001"}}]',
        [call("retrieve_payment_status", '{"transaction_id":"T1001"}', 0)],
    ),
    (
        ToolFormat.MISTRAL,
        'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, '
        '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}, "id": "f5g6h7i8j"}]',
        [
            ("text", "Checking."),
            call("get_weather", '{"city":"Paris"}', 0),
            call("get_time", '{"tz":"Europe/Paris"}', 1),
        ],
    ),
    (
        ToolFormat.MISTRAL,
        '[TOOL_CALLS]get_weather[ARGS]{"location": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{}',
        [call("get_weather", '{"location":"Paris","unit":"celsius"}', 0), call("get_time", "{}", 1)],
    ),
    (
        ToolFormat.MISTRAL,
        '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]"{\\"city\\": \\"Zürich\\"}"',
        [call("get_weather", '{"city":"Zürich"}', 0)],
    ),
    (
        ToolFormat.MISTRAL,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}',
        [("text", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}')],
    ),
    (
        ToolFormat.MISTRAL,
        "[TOOL_CALLS] Sorry, I can't call tools [here].",
        [("text", "[TOOL_CALLS] Sorry, I can't call tools [here].")],
    ),
    (  # an invalid call does not swallow a real one after it
        ToolFormat.MISTRAL,
        '[TOOL_CALLS]oops] [TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}',
        [("text", "[TOOL_CALLS]oops] "), call("get_time", '{"tz":"UTC"}', 0)],
    ),
    (
        ToolFormat.MISTRAL,
        "Lists look like [1, 2] or [TOOL].",
        [("text", "Lists look like [1, 2] or [TOOL].")],
    ),
]


@pytest.mark.parametrize(("fmt", "text", "expected"), TOOL_CASES)
def test_tool_call_parser_is_chunking_independent(fmt: ToolFormat, text: str, expected: list[Any]) -> None:
    for chunks in chunkings(text):
        events = run_events(lambda: ToolCallParser(fmt), chunks)
        assert normalize(events) == expected, chunks
        ids = [ev.call.id for ev in events if isinstance(ev, ToolCallEvent)]
        assert len(set(ids)) == len(ids)


def test_hermes_streams_text_and_holds_only_a_marker_prefix() -> None:
    parser = ToolCallParser(ToolFormat.HERMES)
    assert parser.feed("Sure") == [TextDelta("Sure")]
    assert parser.feed(" <tool_") == [TextDelta(" ")]
    assert parser.feed("ca") == []
    assert parser.feed("r") == [TextDelta("<tool_car")]
    assert parser.feed('<tool_call>{"name": "f", "arguments": {}}') == []
    [event] = parser.feed("</tool_call>")
    assert isinstance(event, ToolCallEvent) and (event.call.name, event.call.arguments, event.index) == (
        "f",
        "{}",
        0,
    )


def test_llama3_streams_plain_text_but_holds_possible_calls() -> None:
    parser = ToolCallParser(ToolFormat.LLAMA3_JSON)
    assert parser.feed("Hello") == [TextDelta("Hello")]
    assert parser.feed(' {"name"') == [TextDelta(' {"name"')]  # not at the start: plain text
    parser = ToolCallParser(ToolFormat.LLAMA3_JSON)
    assert parser.feed('{"name": "f", "parameters": {}}') == []  # held until the end
    assert normalize(parser.flush()) == [call("f", "{}", 0)]


def test_mistral_call_is_emitted_as_soon_as_its_json_closes() -> None:
    parser = ToolCallParser(ToolFormat.MISTRAL)
    assert parser.feed("[TOOL_CALLS]get_weather[ARGS]") == []
    assert parser.feed('{"city": "Paris"') == []
    assert normalize(parser.feed("}")) == [call("get_weather", '{"city":"Paris"}', 0)]  # before flush
    assert parser.flush() == []
    parser = ToolCallParser(ToolFormat.MISTRAL)  # arguments as a JSON string end on a quote
    assert parser.feed('[TOOL_CALLS]f[ARGS]"{\\"a\\": 1}') == []
    assert normalize(parser.feed('"')) == [call("f", '{"a":1}', 0)]


def run_pipeline(chunks: list[str]) -> list[Any]:
    """stops -> reasoning -> tool calls, the order engines chain them in."""
    stops, split, tools = StopMatcher(["<|im_end|>"]), ReasoningSplitter(), ToolCallParser(ToolFormat.HERMES)
    events: list[Any] = []
    pieces: list[list[Any]] = []
    for chunk in chunks:
        piece, stopped = stops.feed(chunk)
        pieces.append(split.feed(piece))
        if stopped:
            break
    pieces.append(split.feed(stops.flush()) + split.flush())
    for ev in (ev for batch in pieces for ev in batch):
        events.extend(tools.feed(ev.text) if isinstance(ev, TextDelta) else [ev])
    return events + tools.flush()


def test_reasoning_then_tool_call_pipeline() -> None:
    # Qwen3: think block, then a hermes call, then the end-of-turn token used as a stop string.
    text = (
        "<think>\nThe user wants the weather in Paris; I'll call get_weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    )
    for chunks in chunkings(text):
        assert normalize(run_pipeline(chunks)) == [
            ("reasoning", "The user wants the weather in Paris; I'll call get_weather.\n"),
            call("get_weather", '{"city":"Paris"}', 0),
        ], chunks


QWEN25_TOOLS_TEMPLATE = """{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}"""
QWEN3_CODER_TOOLS_TEMPLATE = "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}"
MISTRAL_NEMO_TEMPLATE = (
    '{{- "[AVAILABLE_TOOLS]" + tools|tojson + "[/AVAILABLE_TOOLS]" }}{{- "[TOOL_CALLS][" }}'
)
GLM_TOOLS_TEMPLATE = "{{ '\\n<tool_call>' + tc.name }}{{ '\\n<arg_key>' + k + '</arg_key>' }}"
CHATML_NO_TOOLS = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}{% endfor %}"


@pytest.mark.parametrize(
    ("template", "hint", "expected"),
    [
        (QWEN25_TOOLS_TEMPLATE, "", ToolFormat.HERMES),
        (QWEN3_CODER_TOOLS_TEMPLATE, "Qwen3-Coder-30B-A3B", None),  # XML calls: not handled here
        (LLAMA31_TEMPLATE, "", ToolFormat.LLAMA3_JSON),
        (MISTRAL_NEMO_TEMPLATE, "", ToolFormat.MISTRAL),
        (GLM_TOOLS_TEMPLATE, "", None),  # <tool_call>name<arg_key>...: XML, not hermes JSON
        (CHATML_NO_TOOLS, "qwen", None),  # the template wins over the name
        (None, "mlx-community/Qwen2.5-7B-Instruct-4bit", ToolFormat.HERMES),
        (None, "NousResearch/Hermes-3-Llama-3.1-8B", ToolFormat.HERMES),
        (None, "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", ToolFormat.LLAMA3_JSON),
        (None, "Mistral-Nemo-Instruct-2407", ToolFormat.MISTRAL),
        (None, "Qwen3-Coder-30B-A3B-Instruct", None),
        (None, "SmolLM2-135M-Instruct", None),
    ],
)
def test_detect_tool_format(template: str | None, hint: str, expected: ToolFormat | None) -> None:
    assert detect_tool_format(template, hint) == expected
