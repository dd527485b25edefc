"""Anthropic Messages dialect: pure translation tests, then the official `anthropic` SDK and raw HTTP
against a real daemon process (the session `daemon` fixture: "tiny" never emits EOS, "smol" is the
real SmolLM2-135M-Instruct and answers to the glob alias "claude-*")."""

from __future__ import annotations

import dataclasses
import json
import time

import anthropic
import httpx
import mlx_serve_test_raw_reference as raw
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message as SDKMessage
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from mlx_serve.apis.anthropic.protocol import CountTokensBody, MessagesBody
from mlx_serve.apis.anthropic.translate import (
    MessageAssembler,
    StreamEncoder,
    encode_sse,
    stop_reason,
    to_generation,
    usage_body,
)
from mlx_serve.apis.body import validate
from mlx_serve.apis.errors import RequestError
from mlx_serve.engines.types import (
    Finished,
    Message,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    ToolSpec,
    Usage,
)

GREEDY = {"temperature": 0.0}  # SDK 2.x dropped sampling arguments from create(); old clients send them
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def weather_history(city: str = "Paris") -> list[dict]:
    """Two answered tool calls, then a third question: SmolLM2 imitates the pattern (greedy)."""
    history: list[dict] = []
    for i, (town, weather) in enumerate([("London", "rainy"), ("Berlin", "sunny")]):
        history += [
            {"role": "user", "content": f"Weather in {town}?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": f"t{i}", "name": "get_weather", "input": {"city": town}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": weather}],
            },
            {"role": "assistant", "content": f"It is {weather} in {town}."},
        ]
    return history + [{"role": "user", "content": f"Weather in {city}?"}]


def body(**fields) -> dict:
    return {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **fields}


def usage(prompt: int = 10, completion: int = 3, cached: int = 0) -> Usage:
    return Usage(prompt, completion, cached)


# ---- translation (pure) ----------------------------------------------------------------------


def test_request_translates_system_tool_use_and_tool_results() -> None:
    wire = body(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        tools=[WEATHER_TOOL],
        stop_sequences=["END"],
        temperature=0.5,
        top_k=5,
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "need a tool", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "a", "name": "get_weather", "input": {"city": "Oslo"}},
                    {"type": "tool_use", "id": "b", "name": "get_weather", "input": {"city": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "a", "content": "cold"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "b",
                        "content": [{"type": "text", "text": "down"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
    )
    gen = to_generation(validate(MessagesBody, wire))
    assert gen.messages == (
        Message("system", "Be brief.\n\nUse tools."),
        Message("user", "Weather?"),
        Message(
            "assistant",
            "Checking.",
            (
                ToolCall("a", "get_weather", '{"city": "Oslo"}'),
                ToolCall("b", "get_weather", '{"city": "Rome"}'),
            ),
            reasoning="need a tool",
        ),
        Message("tool", "cold", tool_call_id="a", name="get_weather"),
        Message("tool", "Error: down", tool_call_id="b", name="get_weather"),
        Message("user", "And tomorrow?"),
    )
    assert gen.tools == (ToolSpec("get_weather", WEATHER_TOOL["description"], WEATHER_TOOL["input_schema"]),)
    s = gen.sampling
    assert (s.max_tokens, s.stop, s.temperature, s.top_k, s.top_p) == (16, ("END",), 0.5, 5, None)
    assert gen.enable_thinking is None and gen.tool_choice is None


@pytest.mark.parametrize(
    ("choice", "thinking", "expected_choice", "has_tools", "expected_thinking"),
    [
        ({"type": "auto"}, {"type": "enabled", "budget_tokens": 1024}, "auto", True, True),
        ({"type": "any"}, {"type": "disabled"}, "required", True, False),
        ({"type": "tool", "name": "get_weather"}, {"type": "adaptive"}, {"name": "get_weather"}, True, True),
        ({"type": "none"}, None, "none", False, None),  # the model is not shown the tools at all
    ],
)
def test_tool_choice_and_thinking(choice, thinking, expected_choice, has_tools, expected_thinking) -> None:
    wire = body(max_tokens=2048, tools=[WEATHER_TOOL], tool_choice=choice, thinking=thinking)
    gen = to_generation(validate(MessagesBody, wire))
    assert gen.tool_choice == expected_choice
    assert bool(gen.tools) is has_tools
    assert gen.enable_thinking is expected_thinking


def test_consecutive_messages_of_one_role_form_one_turn() -> None:
    call = {"type": "tool_use", "id": "x", "name": "f", "input": {"a": 1}}
    wire = body(
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "Let me look."},
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": "(reminder)"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "r"}]},
        ]
    )
    gen = to_generation(validate(MessagesBody, wire))
    assert gen.messages[-1] == Message("tool", "r", tool_call_id="x", name="f")
    assert gen.messages[2].tool_calls == (ToolCall("x", "f", '{"a": 1}'),)


def test_count_tokens_builds_the_same_prompt_as_messages() -> None:
    wire = body(system="S", tools=[WEATHER_TOOL], messages=weather_history())
    counted = to_generation(validate(CountTokensBody, wire))
    generated = to_generation(validate(MessagesBody, wire))
    assert (counted.messages, counted.tools, counted.tool_choice) == (
        generated.messages,
        generated.tools,
        generated.tool_choice,
    )


@pytest.mark.parametrize(
    ("messages", "param", "needle"),
    [
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "messages[1].role",
            "prefill",
        ),
        (
            [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "r"}]}],
            "messages[0].content[0].tool_use_id",
            "unknown tool_use_id 'x'",
        ),
        (
            [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]},
                {"role": "assistant", "content": "done"},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]},
            ],
            "messages[3].content[0].tool_use_id",
            "previous assistant message",
        ),
        (
            [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}],
            "messages[0].content[0]",
            "not allowed in user messages",
        ),
        (
            [
                {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]},
                {"role": "user", "content": "q"},
            ],
            "messages[0].content[0]",
            "not allowed in assistant messages",
        ),
    ],
)
def test_request_translation_errors_name_the_field(messages, param, needle) -> None:
    with pytest.raises(RequestError) as err:
        to_generation(validate(MessagesBody, body(messages=messages)))
    assert err.value.param == param and needle in err.value.message


def test_stop_reasons_and_usage() -> None:
    assert stop_reason(Finished("stop", usage())) == ("end_turn", None)
    assert stop_reason(Finished("length", usage())) == ("max_tokens", None)
    assert stop_reason(Finished("tool_calls", usage())) == ("tool_use", None)
    assert stop_reason(Finished("context_overflow", usage())) == ("model_context_window_exceeded", None)

    @dataclasses.dataclass(frozen=True)
    class WithStop(Finished):  # the proposed contract addition: which stop string ended generation
        stop_sequence: str | None = None

    assert stop_reason(WithStop("stop", usage(), stop_sequence="END")) == ("stop_sequence", "END")
    assert stop_reason(WithStop("stop", usage())) == ("end_turn", None)
    # cached prefix tokens are reported apart, as Anthropic does; the sum is the prompt size
    assert usage_body(usage(prompt=40, completion=5, cached=32)) == {
        "input_tokens": 8,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 32,
    }


ENGINE_EVENTS = [
    ReasoningDelta("Let me "),
    ReasoningDelta("think."),
    TextDelta("Hello"),
    TextDelta(""),
    TextDelta(" world"),
    ToolCallEvent(ToolCall("call_1", "get_weather", '{"city": "Paris"}')),
    ToolCallEvent(ToolCall("call_2", "get_weather", '{"city": "Nice"}'), index=1),
    Finished("tool_calls", usage(prompt=12, completion=9, cached=4)),
]


def test_stream_events_follow_anthropic_and_assemble_like_the_plain_body() -> None:
    encoder = StreamEncoder("smol", "msg_1")
    events = encoder.start() + [e for event in ENGINE_EVENTS for e in encoder.feed(event)]
    types = [kind for kind, _ in events]
    assert types == [
        "message_start",
        "ping",
        "content_block_start",  # 0 thinking
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 1 text
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 2 tool_use
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 3 tool_use
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    adapter = TypeAdapter(RawMessageStreamEvent)
    snapshot = None
    for kind, data in events:
        assert data["type"] == kind
        if kind == "ping":
            continue
        parsed = adapter.validate_python(data)  # the SDK's own event models
        snapshot = accumulate_event(event=parsed, current_snapshot=snapshot, json_bufs={})
    assert snapshot is not None
    deltas = [d["delta"]["type"] for k, d in events if k == "content_block_delta"]
    assert deltas == ["thinking_delta"] * 2 + ["text_delta"] * 2 + ["input_json_delta"] * 2

    assembler = MessageAssembler("smol", "msg_1")
    for event in ENGINE_EVENTS:
        assembler.feed(event)
    plain = assembler.body()
    SDKMessage.model_validate(plain)
    # what the SDK's stream helper assembles equals the non-streaming body
    assert [b.to_dict(exclude_none=True) for b in snapshot.content] == plain["content"]
    assert (snapshot.stop_reason, snapshot.stop_sequence) == (plain["stop_reason"], plain["stop_sequence"])
    assert snapshot.usage.to_dict(exclude_none=True) == plain["usage"]
    assert plain["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": ""},
        {"type": "text", "text": "Hello world"},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Nice"}},
    ]
    assert plain["stop_reason"] == "tool_use"
    assert plain["usage"] == {
        "input_tokens": 8,
        "output_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }


def test_engine_error_mid_stream_becomes_an_error_event() -> None:
    encoder = StreamEncoder("tiny", "msg_2")
    encoder.start()
    events = encoder.feed(TextDelta("partial")) + encoder.feed(
        Finished("error", usage(), error="decode failed")
    )
    assert [k for k, _ in events] == [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "error",
    ]
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "decode failed"}}


def test_sse_framing() -> None:
    raw = encode_sse([("ping", {"type": "ping"}), ("message_stop", {"type": "message_stop"})])
    assert (
        raw == b'event: ping\ndata: {"type":"ping"}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    )


# ---- the real daemon -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="not-checked", max_retries=0, timeout=300)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def total_input(message) -> int:
    return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)


def reference(smollm2_gguf, request: dict) -> raw.Completion:
    """What llama.cpp itself generates greedily for a body on this machine (greedy text depends on
    the CPU's kernels): the body as the daemon translates it, rendered as the engine renders it."""
    return raw.llama_request(smollm2_gguf, to_generation(validate(MessagesBody, {**request, **GREEDY})))


def stop_reason_of(ref: raw.Completion) -> str:
    return "tool_use" if ref.tool_call() else {"stop": "end_turn", "length": "max_tokens"}[ref.finish]


def test_glob_alias_resolves_and_smollm2_answers_as_llama_cpp_does(
    client: anthropic.Anthropic, smollm2_gguf
) -> None:
    reply = client.messages.create(
        model="claude-haiku-4-5", max_tokens=24, messages=CAPITAL, extra_body=GREEDY
    )
    assert reply.model == "smol"  # the resolved profile model, like Anthropic resolving an alias
    ref = reference(smollm2_gguf, {"model": "smol", "max_tokens": 24, "messages": CAPITAL})
    assert text_of(reply) == ref.text and ref.text.strip()  # llama.cpp's own answer on this CPU
    assert reply.stop_reason == stop_reason_of(ref) and reply.stop_sequence is None
    assert reply.id.startswith("msg_") and reply.role == "assistant" and reply.type == "message"
    assert reply.usage.output_tokens == ref.completion_tokens and total_input(reply) == ref.prompt_tokens


def test_plain_body_validates_against_the_sdk_model(daemon) -> None:
    raw = httpx.post(
        f"{daemon.url}/v1/messages",
        json={"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
        headers={
            "Authorization": "Bearer whatever",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "x",
        },
        timeout=120,
    )
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    message = SDKMessage.model_validate(raw.json())
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_stream_helper_assembles_the_same_message_as_plain(client: anthropic.Anthropic, smollm2_gguf) -> None:
    plain = client.messages.create(model="smol", max_tokens=24, messages=CAPITAL, extra_body=GREEDY)
    seen: list[str] = []
    texts: list[str] = []
    with client.messages.stream(model="smol", max_tokens=24, messages=CAPITAL, extra_body=GREEDY) as stream:
        for event in stream:
            seen.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                texts.append(event.delta.text)
        final = stream.get_final_message()
    assert seen[0] == "message_start" and seen[-1] == "message_stop" and seen[-2] == "message_delta"
    assert seen.count("content_block_start") == seen.count("content_block_stop") == 1
    assert len(texts) > 3  # streamed token by token, not in one piece
    assert text_of(final) == "".join(texts) == text_of(plain)
    assert (
        text_of(final)
        == reference(smollm2_gguf, {"model": "smol", "max_tokens": 24, "messages": CAPITAL}).text
    )
    assert (final.stop_reason, final.usage.output_tokens) == (plain.stop_reason, plain.usage.output_tokens)
    assert total_input(final) == total_input(plain)


def test_raw_stream_has_event_lines_and_a_ping(daemon) -> None:
    payload = {
        "model": "tiny",
        "max_tokens": 4,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with httpx.stream("POST", f"{daemon.url}/v1/messages", json=payload, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    frames = [f for f in raw.split("\n\n") if f]
    pairs = [
        (f.split("\n")[0].removeprefix("event: "), json.loads(f.split("\n")[1].removeprefix("data: ")))
        for f in frames
    ]
    assert all(kind == data["type"] for kind, data in pairs)
    assert [k for k, _ in pairs[:2]] == ["message_start", "ping"]
    delta = next(d for k, d in pairs if k == "message_delta")
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 4


def test_max_tokens_ends_with_stop_reason_max_tokens(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(model="tiny", max_tokens=7, messages=[{"role": "user", "content": "go"}])
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 7


def _stop_case(client: anthropic.Anthropic) -> tuple[str, str, anthropic.types.Message]:
    """(full greedy text, a stop string from its middle, the reply generated with that stop)."""
    messages = [{"role": "user", "content": "Tell me something."}]
    full = text_of(client.messages.create(model="tiny", max_tokens=20, messages=messages, extra_body=GREEDY))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    reply = client.messages.create(
        model="tiny", max_tokens=20, messages=messages, stop_sequences=["\x00never", stop], extra_body=GREEDY
    )
    return full, stop, reply


def test_stop_sequences_cut_the_text_before_the_stop(client: anthropic.Anthropic) -> None:
    full, stop, reply = _stop_case(client)
    assert text_of(reply) == full[: full.index(stop)]
    assert reply.usage.output_tokens < 20


@pytest.mark.xfail(
    "stop_sequence" not in {f.name for f in dataclasses.fields(Finished)},
    reason="engines do not report which stop string ended generation (proposed: Finished.stop_sequence)",
    strict=True,
)
def test_stop_sequences_are_reported(client: anthropic.Anthropic) -> None:
    _, stop, reply = _stop_case(client)
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)


def test_system_prompt_as_string_and_as_blocks(client: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "hi"}]
    blocks = [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}]
    as_string = client.messages.count_tokens(
        model="tiny", system="You are terse.\n\nAnswer in French.", messages=messages
    )
    as_blocks = client.messages.count_tokens(model="tiny", system=blocks, messages=messages)
    other = client.messages.count_tokens(
        model="tiny", system="You are verbose.\n\nAnswer in French.", messages=messages
    )
    without = client.messages.count_tokens(model="tiny", messages=messages)
    assert as_string.input_tokens == as_blocks.input_tokens > 0
    assert other.input_tokens != without.input_tokens  # the system prompt reaches the template
    reply = client.messages.create(model="tiny", max_tokens=2, system=blocks, messages=messages)
    assert total_input(reply) == as_blocks.input_tokens


def test_count_tokens_is_exact(client: anthropic.Anthropic) -> None:
    request = {
        "model": "smol",
        "system": "You check the weather.",
        "tools": [WEATHER_TOOL],
        "messages": weather_history("Madrid"),
    }
    counted = client.messages.count_tokens(**request).input_tokens
    plain = client.messages.create(max_tokens=1, **request)
    with client.messages.stream(max_tokens=1, **request) as stream:
        streamed = stream.get_final_message()
    # Anthropic accounting: input_tokens + cache_read_input_tokens is the whole prompt
    assert counted == total_input(plain) == total_input(streamed) > 100
    # and the count responds to every part of the request
    assert client.messages.count_tokens(**{**request, "tools": []}).input_tokens < counted


def test_tool_results_reach_the_model_and_get_answered(client: anthropic.Anthropic, smollm2_gguf) -> None:
    history = weather_history("Rome")[:3]  # user question, assistant tool_use, user tool_result
    short = client.messages.count_tokens(model="smol", tools=[WEATHER_TOOL], messages=history).input_tokens
    longer = [
        *history[:2],
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t0", "content": "rainy, windy and cold all week"}
            ],
        },
    ]
    assert (
        client.messages.count_tokens(model="smol", tools=[WEATHER_TOOL], messages=longer).input_tokens > short
    )
    request = {"model": "smol", "max_tokens": 12, "tools": [WEATHER_TOOL], "messages": history}
    reply = client.messages.create(**request, extra_body=GREEDY)
    ref = reference(smollm2_gguf, request)  # llama.cpp's own answer on this CPU
    assert "rainy" in ref.prompt and total_input(reply) == ref.prompt_tokens  # the result is in the prompt
    assert reply.stop_reason == stop_reason_of(ref)
    if ref.tool_call() is None:
        assert text_of(reply) == ref.text


def test_model_emits_tool_use_plain_and_streaming_then_takes_the_result(
    client: anthropic.Anthropic, smollm2_gguf
) -> None:
    request = {
        "model": "smol",
        "max_tokens": 40,
        "tools": [WEATHER_TOOL],
        "messages": weather_history("Paris"),
    }
    plain = client.messages.create(**request, extra_body=GREEDY)
    # Whether SmolLM2 calls the tool, and with what, is its greedy text on this CPU: llama.cpp's own.
    ref = reference(smollm2_gguf, request)
    expected = ref.tool_call()
    assert total_input(plain) == ref.prompt_tokens
    if expected is None:
        assert (text_of(plain), plain.stop_reason) == (ref.text, stop_reason_of(ref))
        pytest.skip(f"SmolLM2 on this CPU answers without a tool call: {ref.text!r}")
    assert plain.stop_reason == "tool_use"
    call = next(b for b in plain.content if b.type == "tool_use")
    assert (call.name, call.input) == (expected["name"], expected["arguments"])

    json_deltas = []
    with client.messages.stream(**request, extra_body=GREEDY) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                json_deltas.append(event.delta.partial_json)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    streamed_call = next(b for b in final.content if b.type == "tool_use")
    assert (streamed_call.name, streamed_call.input) == (expected["name"], expected["arguments"])
    assert json.loads("".join(json_deltas)) == expected["arguments"]

    # the client's round trip: send the assistant turn back as is, plus the result
    follow_up = [
        *request["messages"],
        plain.to_param(),
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "foggy"}]},
    ]
    reply = client.messages.create(**{**request, "messages": follow_up, "max_tokens": 12}, extra_body=GREEDY)
    assert reply.stop_reason != "tool_use" or reply.content


def test_thinking_settings_and_past_thinking_blocks_are_accepted(client: anthropic.Anthropic) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "greet back", "signature": "abc"},
                {"type": "text", "text": "Hello!"},
            ],
        },
        {"role": "user", "content": "bye"},
    ]
    counted = client.messages.count_tokens(
        model="tiny", messages=messages, thinking={"type": "enabled", "budget_tokens": 1024}
    )
    assert counted.input_tokens > 0
    reply = client.messages.create(
        model="tiny", max_tokens=3, messages=messages, thinking={"type": "disabled"}
    )
    assert reply.usage.output_tokens == 3


def test_unknown_model_is_a_404_for_the_sdk(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="gpt-nothing", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error"
    assert "gpt-nothing" in err.value.message
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="../etc/passwd", messages=[{"role": "user", "content": "x"}])


def _active(daemon, model_id: str) -> int:
    return next(m["active"] for m in daemon.get_json("/ready")["models"] if m["id"] == model_id)


def test_client_disconnect_cancels_the_generation(daemon) -> None:
    payload = {
        "model": "tiny",
        "max_tokens": 2000,
        "stream": True,
        "messages": [{"role": "user", "content": "go"}],
    }
    with httpx.stream("POST", f"{daemon.url}/v1/messages", json=payload, timeout=120) as resp:
        lines = resp.iter_lines()
        deltas = 0
        for line in lines:
            deltas += line.startswith("event: content_block_delta")
            if deltas == 3:
                break
        assert _active(daemon, "tiny") == 1
    # 2000 tokens take many seconds on these cores; a cancelled generation frees the slot at once
    deadline = time.monotonic() + 3
    while _active(daemon, "tiny") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _active(daemon, "tiny") == 0


# ---- bad input: status and Anthropic's error shape ---------------------------------------------

OK = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
LONG = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hello " * 3000}]}
TOOL_TURN = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}
INVALID = "invalid_request_error"
BAD_INPUTS = [
    # (id, path suffix, raw body or dict, status, error type, message fragment)
    ("malformed json", "", b'{"model": "tiny",', 400, INVALID, "not valid JSON"),
    ("empty body", "", b"", 400, INVALID, "empty"),
    ("json array", "", b"[1, 2]", 400, INVALID, "JSON object"),
    (
        "nan",
        "",
        b'{"model":"tiny","max_tokens":4,"temperature":NaN,"messages":[{"role":"user","content":"hi"}]}',
        400,
        INVALID,
        "NaN",
    ),
    (
        "missing max_tokens",
        "",
        {k: v for k, v in OK.items() if k != "max_tokens"},
        400,
        INVALID,
        "max_tokens",
    ),
    ("max_tokens zero", "", {**OK, "max_tokens": 0}, 400, INVALID, "max_tokens"),
    ("max_tokens negative", "", {**OK, "max_tokens": -5}, 400, INVALID, "max_tokens"),
    ("max_tokens over cap", "", {**OK, "max_tokens": 10**12}, 400, INVALID, "limit of 131072"),
    ("max_tokens string", "", {**OK, "max_tokens": "4"}, 400, INVALID, "max_tokens"),
    ("max_tokens float", "", {**OK, "max_tokens": 4.5}, 400, INVALID, "max_tokens"),
    ("temperature 5", "", {**OK, "temperature": 5}, 400, INVALID, "temperature"),
    ("top_p 1.5", "", {**OK, "top_p": 1.5}, 400, INVALID, "top_p"),
    ("top_k negative", "", {**OK, "top_k": -1}, 400, INVALID, "top_k"),
    ("stream not bool", "", {**OK, "stream": "yes"}, 400, INVALID, "stream"),
    ("unknown model", "", {**OK, "model": "no-such-model"}, 404, "not_found_error", "no-such-model"),
    (
        "model is a path",
        "",
        {**OK, "model": "/etc/passwd"},
        404,
        "not_found_error",
        "not in this server's profile",
    ),
    ("empty messages", "", {**OK, "messages": []}, 400, INVALID, "messages"),
    ("messages not a list", "", {**OK, "messages": "hi"}, 400, INVALID, "messages"),
    (
        "bad role",
        "",
        {**OK, "messages": [{"role": "system", "content": "x"}]},
        400,
        INVALID,
        "messages[0].role",
    ),
    (
        "content wrong type",
        "",
        {**OK, "messages": [{"role": "user", "content": 5}]},
        400,
        INVALID,
        "messages[0].content",
    ),
    (
        "empty content list",
        "",
        {**OK, "messages": [{"role": "user", "content": []}]},
        400,
        INVALID,
        "messages[0].content",
    ),
    (
        "image block",
        "",
        {
            **OK,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        }
                    ],
                }
            ],
        },
        400,
        INVALID,
        "image content blocks are not supported",
    ),
    (
        "document block",
        "",
        {**OK, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
        400,
        INVALID,
        "document",
    ),
    (
        "unknown block type",
        "",
        {**OK, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        400,
        INVALID,
        "audio",
    ),
    (
        "too many stop sequences",
        "",
        {**OK, "stop_sequences": [f"s{i}" for i in range(17)]},
        400,
        INVALID,
        "at most 16 stop sequences",
    ),
    ("empty stop sequence", "", {**OK, "stop_sequences": [""]}, 400, INVALID, "stop_sequences[0]"),
    ("prompt over context", "", LONG, 400, INVALID, "context length of 2048"),
    (
        "tool_result without tool_use",
        "",
        {
            **OK,
            "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "ghost", "content": "x"}]}
            ],
        },
        400,
        INVALID,
        "unknown tool_use_id 'ghost'",
    ),
    (
        "tool_result with the wrong id",
        "",
        {
            **OK,
            "messages": [
                {"role": "user", "content": "q"},
                TOOL_TURN,
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2"}]},
            ],
        },
        400,
        INVALID,
        "unknown tool_use_id 't2'",
    ),
    (
        "assistant prefill",
        "",
        {**OK, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A:"}]},
        400,
        INVALID,
        "prefill",
    ),
    ("tool without schema", "", {**OK, "tools": [{"name": "f"}]}, 400, INVALID, "tools[0].input_schema"),
    (
        "server tool",
        "",
        {**OK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        400,
        INVALID,
        "only client tools",
    ),
    (
        "tool_choice unknown tool",
        "",
        {**OK, "tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "nope"}},
        400,
        INVALID,
        "'nope'",
    ),
    (
        "tool_choice any without tools",
        "",
        {**OK, "tool_choice": {"type": "any"}},
        400,
        INVALID,
        "needs tools",
    ),
    (
        "thinking budget too small",
        "",
        {**OK, "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 10}},
        400,
        INVALID,
        "budget_tokens",
    ),
    (
        "thinking budget over max_tokens",
        "",
        {**OK, "thinking": {"type": "enabled", "budget_tokens": 2048}},
        400,
        INVALID,
        "less than max_tokens",
    ),
    (
        "stream with unknown model",
        "",
        {**OK, "stream": True, "model": "nope"},
        404,
        "not_found_error",
        "nope",
    ),
    (
        "count_tokens unknown model",
        "/count_tokens",
        {"model": "nope", "messages": OK["messages"]},
        404,
        "not_found_error",
        "nope",
    ),
    ("count_tokens without messages", "/count_tokens", {"model": "tiny"}, 400, INVALID, "messages"),
    (
        "count_tokens image",
        "/count_tokens",
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        400,
        INVALID,
        "image",
    ),
]


@pytest.mark.parametrize(
    ("path", "payload", "status", "kind", "fragment"),
    [c[1:] for c in BAD_INPUTS],
    ids=[c[0] for c in BAD_INPUTS],
)
def test_bad_input(daemon, path: str, payload, status: int, kind: str, fragment: str) -> None:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    resp = httpx.post(
        f"{daemon.url}/v1/messages{path}",
        content=content,
        headers={"content-type": "application/json", "x-api-key": "k", "anthropic-version": "2023-06-01"},
        timeout=120,
    )
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    data = resp.json()
    assert set(data) == {"type", "error"} and data["type"] == "error"
    assert set(data["error"]) == {"type", "message"}
    assert data["error"]["type"] == kind
    assert fragment in data["error"]["message"], data["error"]["message"]


def test_oversized_body_is_413(daemon) -> None:
    huge = json.dumps({**OK, "messages": [{"role": "user", "content": "x" * (17 * 1024 * 1024)}]})
    resp = httpx.post(
        f"{daemon.url}/v1/messages", content=huge, headers={"content-type": "application/json"}, timeout=120
    )
    assert resp.status_code == 413
    assert resp.json() == {
        "type": "error",
        "error": {"type": "request_too_large", "message": "request body is too large"},
    }


def test_wrong_method_is_an_anthropic_error(daemon) -> None:
    resp = httpx.get(f"{daemon.url}/v1/messages", timeout=30)
    assert resp.status_code == 405
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == INVALID


def test_client_leaving_a_plain_request_cancels_it(daemon) -> None:
    payload = {"model": "tiny", "max_tokens": 2000, "messages": [{"role": "user", "content": "go on"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{daemon.url}/v1/messages", json=payload, timeout=httpx.Timeout(30, read=1.0))
    deadline = time.monotonic() + 3
    while _active(daemon, "tiny") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _active(daemon, "tiny") == 0


# ---- Claude Code's billing header (prompt normalization) ------------------------------------


def billing_block(nonce: str) -> dict:
    return {
        "type": "text",
        "text": f"x-anthropic-billing-header: cc_version=2.1.100.{nonce[:3]}; cc_entrypoint=cli; cch={nonce};",
    }


def test_the_billing_header_line_is_all_that_normalization_removes() -> None:
    system = [billing_block("eb6c6"), {"type": "text", "text": "You are Claude Code."}]
    request = to_generation(validate(MessagesBody, body(system=system)))
    assert request.messages[0] == Message("system", "You are Claude Code.")
    inline = f"{billing_block('0aaa9')['text']}\nYou are Claude Code."
    request = to_generation(validate(MessagesBody, body(system=inline)))
    assert request.messages[0] == Message("system", "You are Claude Code.")
    # only a leading header is billing metadata; the same words elsewhere are the user's text
    quoted = "Explain this line:\nx-anthropic-billing-header: cch=1;"
    request = to_generation(validate(MessagesBody, body(system=quoted)))
    assert request.messages[0] == Message("system", quoted)
    request = to_generation(validate(MessagesBody, body(system=[billing_block("12345")])))
    assert request.messages[0].role == "user"  # a header alone leaves no system message


def test_a_changing_billing_header_does_not_defeat_the_prefix_cache(client: anthropic.Anthropic) -> None:
    system_prompt = "You are a careful assistant. " * 40  # a long, stable system prompt
    replies = []
    for nonce in ("36ee5", "0aaa9"):
        system = [billing_block(nonce), {"type": "text", "text": system_prompt}]
        replies.append(
            client.messages.create(
                model="smol", max_tokens=4, system=system, messages=CAPITAL, extra_body=GREEDY
            )
        )
    assert replies[1].usage.cache_read_input_tokens >= 200  # the whole system prompt was reused
    assert total_input(replies[0]) == total_input(replies[1])  # both saw the same prompt
