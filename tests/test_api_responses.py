"""OpenAI Responses API (`POST /v1/responses`): pure translation units, then the real daemon driven
by the official `openai` SDK and raw HTTP. Every body, stream event and final streamed response is
validated against the official OpenAPI spec (`Response` and the per-type stream event schemas)."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import mlx_serve_test_raw_reference as raw
import openai
import pytest

from mlx_serve.apis.errors import RequestError
from mlx_serve.apis.openai import responses
from mlx_serve.apis.openai import responses_items as ri
from mlx_serve.apis.openai import responses_translate as rt
from mlx_serve.engines.types import (
    Finished,
    Message,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallEvent,
    Usage,
)

_vspec = importlib.util.spec_from_file_location(
    "mlx_serve_openapi_validator", Path(__file__).with_name("openapi_validator.py")
)
assert _vspec is not None and _vspec.loader is not None
oas = importlib.util.module_from_spec(_vspec)
sys.modules[_vspec.name] = oas
_vspec.loader.exec_module(oas)

PATH = "/v1/responses"
PARIS = "What is the capital of France? Answer in one sentence."
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
# A worked example SmolLM2 imitates (the same history the chat test uses, as Responses items).
WEATHER_HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Berlin?"},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Berlin"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "12 C, sunny"},
    {"role": "assistant", "content": "It is 12 C and sunny in Berlin."},
]


def events_are_valid(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Each event matches its spec schema; sequence numbers count up from 0; the lifecycle is
    created, in_progress, ..., one terminal event. Returns the terminal event's response."""
    for event in events:
        oas.validate(EVENT_SCHEMAS[event["type"]], event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert events[-1]["type"] in terminal and not any(e["type"] in terminal for e in events[:-1])
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(ids) == 1
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == done == list(range(len(events[-1]["response"]["output"])))
    final = events[-1]["response"]
    oas.validate("Response", final)
    return final


def delta_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def output_text(body: dict[str, Any]) -> str:
    """What the SDK's `output_text` property computes, from a raw body."""
    return "".join(
        part["text"]
        for item in body["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


# ---- translation (pure) ----------------------------------------------------------------------


def request(**fields: Any) -> rt.ResponsesRequest:
    return rt.ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def test_assembler_event_sequence_and_final_response() -> None:
    body = request(tools=[WEATHER_TOOL], include=["message.output_text.logprobs"])
    assembler = responses.ResponseAssembler("resp_1", "m", rt.echo_fields(body), logprobs=True)
    engine_events = [
        ReasoningDelta("let me think"),
        TextDelta("Hel", (TokenLogprob("Hel", -0.5, (("Hel", -0.5), ("Yo", -1.5))),)),
        TextDelta("lo"),
        ToolCallEvent(ToolCall("call_a", "get_weather", '{"city": "Paris"}')),
        Finished("tool_calls", Usage(10, 5, cached_prompt_tokens=4)),
    ]
    events = assembler.start() + [e for ev in engine_events for e in assembler.feed(ev)]
    final = events_are_valid(events)
    assert [e["type"] for e in events[2:]] == [
        "response.output_item.added",  # reasoning
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # message
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # function call
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final["status"] == "completed" and final["completed_at"] and final["error"] is None
    reasoning, message, call = final["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "let me think"}]
    assert message["content"][0]["text"] == "Hello" and message["status"] == "completed"
    assert message["content"][0]["logprobs"][0]["top_logprobs"][1] == {
        "token": "Yo",
        "logprob": -1.5,
        "bytes": [89, 111],
    }
    assert (
        call["call_id"] == "call_a"
        and call["arguments"] == '{"city": "Paris"}'
        and call["id"].startswith("fc_")
    )
    assert final["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    }
    assert final["tools"][0]["name"] == "get_weather" and "output_text" not in final
    assert assembler.assistant_message() == Message(
        role="assistant",
        content="Hello",
        tool_calls=(ToolCall("call_a", "get_weather", '{"city": "Paris"}'),),
        reasoning="let me think",
    )


def test_assembler_length_and_failure() -> None:
    assembler = responses.ResponseAssembler("resp_2", "m", rt.echo_fields(request()), logprobs=False)
    events = (
        assembler.start() + assembler.feed(TextDelta("abc")) + assembler.feed(Finished("length", Usage(3, 1)))
    )
    final = events_are_valid(events)
    assert events[-1]["type"] == "response.incomplete"
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete" and final["completed_at"] is None
    failing = responses.ResponseAssembler("resp_3", "m", rt.echo_fields(request()), logprobs=False)
    events = failing.start() + failing.feed(Finished("error", Usage(3, 0), error="boom"))
    final = events_are_valid(events)
    assert final["status"] == "failed" and final["error"] == {
        "code": "server_error",
        "message": "generation failed: boom",
    }
    empty = responses.ResponseAssembler("resp_4", "m", rt.echo_fields(request()), logprobs=False)
    final = events_are_valid(empty.start() + empty.feed(Finished("stop", Usage(3, 0))))
    assert output_text(final) == "" and final["output"][0]["type"] == "message"


def test_input_items_become_messages() -> None:
    items = ri.parse_items(
        [
            {
                "role": "developer",
                "content": [{"type": "input_text", "text": "Be "}, {"type": "input_text", "text": "brief"}],
            },
            *WEATHER_HISTORY[:1],
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "call the tool"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Checking."}],
            },
            *WEATHER_HISTORY[1:3],
            {
                "type": "function_call_output",
                "call_id": "call_0",
                "output": [{"type": "input_text", "text": "old"}],
            },
        ]
    )
    history = (Message(role="assistant", tool_calls=(ToolCall("call_0", "get_time", "{}"),)),)
    messages = ri.to_messages(items, history)
    assert messages == (
        Message(role="system", content="Be brief"),
        Message(role="user", content="What is the weather in Berlin?"),
        Message(
            role="assistant",
            content="Checking.",
            tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Berlin"}'),),
            reasoning="call the tool",
        ),
        Message(role="tool", content="12 C, sunny", tool_call_id="call_1", name="get_weather"),
        Message(role="tool", content="old", tool_call_id="call_0", name="get_time"),
    )
    with pytest.raises(RequestError) as err:
        ri.to_messages(ri.parse_items([WEATHER_HISTORY[2]]), ())
    assert err.value.param == "input[0].call_id"


def test_request_translation() -> None:
    tools = [WEATHER_TOOL, {**WEATHER_TOOL, "name": "get_time"}]
    body = request(
        instructions="Answer briefly.",
        tools=tools,
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=32,
        temperature=0.5,
        top_p=0.9,
        text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
        reasoning={"effort": "none"},
    )
    gen = rt.generation_request(body, ri.to_messages(ri.parse_items(body.input), ()))
    assert gen.messages == (
        Message(role="system", content="Answer briefly."),
        Message(role="user", content="hi"),
    )
    assert [t.name for t in gen.tools] == ["get_time"]
    assert gen.tool_choice == {"type": "function", "function": {"name": "get_time"}}
    assert gen.sampling.max_tokens == 32 and gen.sampling.temperature == 0.5 and gen.sampling.top_p == 0.9
    assert gen.response_format == {"type": "json_schema", "schema": {"type": "object"}}
    assert gen.enable_thinking is False
    echo = rt.echo_fields(body)
    oas.validate("Response", responses.ResponseAssembler("resp_5", "m", echo, logprobs=False).response)
    assert echo["reasoning"] == {"effort": "none", "summary": None}
    assert echo["tool_choice"] == {"type": "function", "name": "get_time"}
    assert echo["text"]["format"]["name"] == "out" and echo["instructions"] == "Answer briefly."
    none = rt.generation_request(request(tools=tools, tool_choice="none"), ())
    assert none.tools == () and none.tool_choice is None
    assert rt.generation_request(request(text={"format": {"type": "json_object"}}), ()).response_format == {
        "type": "json_object"
    }


def test_store_is_a_bounded_lru() -> None:
    store: dict[str, tuple[Message, ...]] = {}
    convo = (Message(role="user", content="x"),)
    for i in range(responses.STORE_LIMIT):
        responses.remember(store, f"r{i}", convo)
    assert responses.recall(store, "r0") == convo  # touched: now the most recently used
    responses.remember(store, "new", convo)
    assert len(store) == responses.STORE_LIMIT
    assert responses.recall(store, "r1") is None and responses.recall(store, "r0") == convo


# ---- the real daemon -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(daemon):
    with httpx.Client(base_url=daemon.url, timeout=300) as c:
        yield c


def post(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = http.post(PATH, json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    oas.validate("Response", data)
    assert "output_text" not in data  # an SDK property, not part of the wire
    return data


def reference(smollm2_gguf: Path, body: dict[str, Any]) -> raw.Completion:
    """What llama.cpp itself generates for a stateless body on this machine (greedy text depends
    on the CPU's kernels): the body as the daemon translates it, rendered as the engine renders it."""
    parsed = rt.ResponsesRequest.model_validate(body)
    conversation = ri.to_messages(ri.parse_items(parsed.input), ())
    return raw.llama_request(smollm2_gguf, rt.generation_request(parsed, conversation))


def status_of(ref: raw.Completion) -> str:
    """A response's status for the reference's ending: max_output_tokens reached is incomplete."""
    return "completed" if ref.finish == "stop" else "incomplete"


def assert_answer_is(data: dict[str, Any], ref: raw.Completion) -> None:
    """A response's output is the reference's: the function call it makes, else its text."""
    expected = ref.tool_call()
    calls = [(i["name"], json.loads(i["arguments"])) for i in data["output"] if i["type"] == "function_call"]
    if expected is None:
        assert calls == [] and output_text(data) == ref.text, data["output"]
        assert data["status"] == status_of(ref)
    else:
        assert calls[:1] == [(expected["name"], expected["arguments"])], data["output"]


def stream(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw SSE: every event is `event: <type>` + `data: <json>` with the same type; no [DONE]."""
    with http.stream("POST", PATH, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = resp.read().decode()
    events = []
    for block in filter(None, text.split("\n\n")):
        head, data = block.split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}", block
        events.append(event)
    events_are_valid(events)
    return events


def test_plain_text_with_the_sdk(client: openai.OpenAI, http: httpx.Client, smollm2_gguf: Path) -> None:
    out = client.responses.create(model="smol", input=PARIS, max_output_tokens=24, temperature=0)
    ref = reference(smollm2_gguf, {"model": "smol", "input": PARIS, "max_output_tokens": 24})
    assert out.output_text == ref.text and ref.text.strip()  # llama.cpp's own answer on this CPU
    assert out.status == status_of(ref) and out.object == "response" and out.model == "smol"
    assert out.id.startswith("resp_") and out.output[0].type == "message"
    assert out.usage and out.usage.output_tokens == ref.completion_tokens
    assert out.usage.input_tokens == ref.prompt_tokens
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    data = post(http, {"model": "smol", "input": PARIS, "max_output_tokens": 24, "temperature": 0})
    assert output_text(data) == out.output_text  # temperature 0: the same answer
    assert data["temperature"] == 0 and data["max_output_tokens"] == 24 and data["store"] is True


def test_streaming_raw_events_and_sdk_helper(
    client: openai.OpenAI, http: httpx.Client, smollm2_gguf: Path
) -> None:
    body = {"model": "smol", "input": PARIS, "max_output_tokens": 24, "temperature": 0}
    events = stream(http, body)
    final = events[-1]["response"]
    ref = reference(smollm2_gguf, body)
    assert events[-1]["type"] == f"response.{status_of(ref)}" and final["status"] == status_of(ref)
    assert delta_text(events) == output_text(final) == ref.text
    kinds = [e["type"] for e in events]
    assert kinds[2:5] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    message_id = final["output"][0]["id"]
    assert all(e["item_id"] == message_id for e in events if "item_id" in e)
    with client.responses.stream(model="smol", input=PARIS, max_output_tokens=24, temperature=0) as sdk:
        deltas = [e.delta for e in sdk if e.type == "response.output_text.delta"]
        streamed = sdk.get_final_response()
    assert streamed.output_text == "".join(deltas) == delta_text(events)
    assert streamed.usage and streamed.usage.output_tokens == final["usage"]["output_tokens"]


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, smollm2_gguf: Path) -> None:
    """The second turn sees exactly the first turn's input and output: the same prompt (token
    count) and the same greedy answer as a chat completion given that history explicitly, and as
    llama.cpp itself for that conversation."""
    first = client.responses.create(model="smol", input=PARIS, max_output_tokens=24, temperature=0)
    follow = "And of Germany?"
    second = client.responses.create(
        model="smol", previous_response_id=first.id, input=follow, max_output_tokens=24, temperature=0
    )
    chat = client.chat.completions.create(
        model="smol",
        messages=[
            {"role": "user", "content": PARIS},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": follow},
        ],
        max_tokens=24,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    assert first.usage and second.usage and chat.usage
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.output_text == chat.choices[0].message.content
    history = (Message("user", PARIS), Message("assistant", first.output_text), Message("user", follow))
    ref = raw.llama_chat(smollm2_gguf, history, 24)
    assert second.output_text == ref.text and second.usage.input_tokens == ref.prompt_tokens
    # store=false keeps nothing to continue from.
    unstored = client.responses.create(model="tiny", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(
            model="tiny", previous_response_id=unstored.id, input="y", max_output_tokens=2
        )
    assert err.value.response.json()["error"]["code"] == "previous_response_not_found"


def test_instructions_are_the_system_message(client: openai.OpenAI) -> None:
    system = "You are a terse assistant."
    out = client.responses.create(model="tiny", instructions=system, input="hi", max_output_tokens=3)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        max_tokens=3,
    )
    assert out.usage and chat.usage and out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.instructions == system


def test_function_output_in_input_is_answered(http: httpx.Client, smollm2_gguf: Path) -> None:
    """A function_call and its function_call_output sent as input items: they reach the prompt, and
    the answer is llama.cpp's own for it."""
    madrid_call = {
        "type": "function_call",
        "call_id": "call_2",
        "name": "get_weather",
        "arguments": '{"city": "Madrid"}',
    }
    body = {
        "model": "smol",
        "input": [
            *WEATHER_HISTORY,
            {"role": "user", "content": "What is the weather in Madrid?"},
            madrid_call,
            {"type": "function_call_output", "call_id": "call_2", "output": "30 C, clear sky"},
        ],
        "tools": [WEATHER_TOOL],
        "max_output_tokens": 30,
        "temperature": 0,
    }
    data = post(http, body)
    ref = reference(smollm2_gguf, body)
    assert "30 C, clear sky" in ref.prompt and data["usage"]["input_tokens"] == ref.prompt_tokens
    assert_answer_is(data, ref)
    assert data["tools"][0]["name"] == "get_weather" and data["tool_choice"] == "auto"


def test_model_function_call_round_trip(
    client: openai.OpenAI, http: httpx.Client, smollm2_gguf: Path
) -> None:
    body = {
        "model": "smol",
        "input": [*WEATHER_HISTORY, {"role": "user", "content": "What is the weather in Madrid?"}],
        "tools": [WEATHER_TOOL],
        "max_output_tokens": 60,
        "temperature": 0,
    }
    data = post(http, body)
    # Whether SmolLM2 calls the tool, and with what, is its greedy text on this CPU: llama.cpp's own.
    ref = reference(smollm2_gguf, body)
    expected = ref.tool_call()
    assert data["usage"]["input_tokens"] == ref.prompt_tokens
    if expected is None:
        assert_answer_is(data, ref)
        pytest.skip(f"SmolLM2 on this CPU answers without a function call: {ref.text!r}")
    calls = [i for i in data["output"] if i["type"] == "function_call"]
    assert data["status"] == "completed" and len(calls) == 1, data["output"]
    call = calls[0]
    assert call["name"] == expected["name"] and json.loads(call["arguments"]) == expected["arguments"]
    assert call["call_id"].startswith("call_") and call["status"] == "completed"
    events = stream(http, body)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["name"] == expected["name"] and json.loads(done["arguments"]) == expected["arguments"]
    streamed_call = events[-1]["response"]["output"][-1]
    assert streamed_call["type"] == "function_call" and streamed_call["call_id"] != call["call_id"]
    # The SDK view, then the tool result goes back through previous_response_id and gets an answer.
    first = client.responses.create(**body)
    sdk_call = next(item for item in first.output if item.type == "function_call")
    result = {"type": "function_call_output", "call_id": sdk_call.call_id, "output": "30 C, clear sky"}
    answer = client.responses.create(
        model="smol",
        previous_response_id=first.id,
        input=[result],
        tools=[WEATHER_TOOL],
        max_output_tokens=30,
        temperature=0,
    )
    # The same as sending the whole conversation: the first turn's output items, then the result.
    replay = [item.model_dump(mode="json", exclude_none=True) for item in first.output]
    ref = reference(
        smollm2_gguf, {**body, "input": [*body["input"], *replay, result], "max_output_tokens": 30}
    )
    assert "30 C, clear sky" in ref.prompt and answer.usage and answer.usage.input_tokens == ref.prompt_tokens
    assert_answer_is(answer.model_dump(mode="json"), ref)


def test_max_output_tokens_is_incomplete(client: openai.OpenAI, http: httpx.Client) -> None:
    body = {"model": "tiny", "input": "tell me a story", "max_output_tokens": 5, "temperature": 0}
    data = post(http, body)
    assert data["status"] == "incomplete" and data["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["usage"]["output_tokens"] == 5 and data["output"][0]["status"] == "incomplete"
    events = list(client.responses.create(**body, stream=True))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.usage and final.usage.output_tokens == 5
    assert final.output_text == output_text(data)  # greedy: the same text both ways
    oas.validate("Response", final.model_dump(mode="json", exclude_unset=True))


def test_logprobs_on_request(http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "input": "hi",
        "max_output_tokens": 4,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
    }
    data = post(http, body)
    logprobs = data["output"][0]["content"][0]["logprobs"]
    assert len(logprobs) == 4 and all(len(lp["top_logprobs"]) == 2 and lp["logprob"] <= 0 for lp in logprobs)
    events = stream(http, body)
    assert sum(len(e["logprobs"]) for e in events if e["type"] == "response.output_text.delta") == 4
    plain = post(http, {"model": "tiny", "input": "hi", "max_output_tokens": 2})
    assert plain["output"][0]["content"][0]["logprobs"] == []


def test_client_disconnect_frees_the_model(daemon, client: openai.OpenAI) -> None:
    """tiny never emits EOS: 2000 tokens keep it busy unless leaving the stream cancels them."""
    started = time.monotonic()
    client.responses.create(model="tiny", input="warm", max_output_tokens=200)
    full_run = (time.monotonic() - started) * 10
    payload = json.dumps({"model": "tiny", "input": "go", "max_output_tokens": 2000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    received = b""
    while received.count(b"response.output_text.delta") < 6:
        received += sock.recv(65536)
    sock.close()
    started = time.monotonic()
    out = client.responses.create(model="tiny", input="next", max_output_tokens=4)
    elapsed = time.monotonic() - started
    assert out.status == "incomplete"
    assert elapsed < full_run / 2, f"the next request waited {elapsed:.1f}s (a full run ~{full_run:.1f}s)"


# ---- bad input -------------------------------------------------------------------------------

OK: dict[str, Any] = {"model": "tiny", "input": "hi", "max_output_tokens": 2}
IMAGE = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
BAD_INPUTS: list[tuple[str, Any, int, str | None, str | None]] = [
    # (case, body (dict, or raw bytes), status, param, code)
    ("malformed json", b'{"model": "tiny", "input": [', 400, None, None),
    ("body not an object", b'["tiny"]', 400, None, None),
    ("NaN temperature", b'{"model": "tiny", "input": "x", "temperature": NaN}', 400, None, None),
    ("no input", {"model": "tiny"}, 400, "input", None),
    ("empty input list", {**OK, "input": []}, 400, "input", None),
    ("input not a string or list", {**OK, "input": 42}, 400, "input", None),
    ("model not a string", {**OK, "model": 5}, 400, "model", None),
    ("unknown model", {**OK, "model": "no-such-model"}, 404, "model", "model_not_found"),
    (
        "unknown model streaming",
        {**OK, "model": "no-such-model", "stream": True},
        404,
        "model",
        "model_not_found",
    ),
    (
        "unknown previous_response_id",
        {**OK, "previous_response_id": "resp_nope"},
        404,
        "previous_response_id",
        "previous_response_not_found",
    ),
    ("max_output_tokens zero", {**OK, "max_output_tokens": 0}, 400, "max_output_tokens", None),
    ("max_output_tokens float", {**OK, "max_output_tokens": 2.5}, 400, "max_output_tokens", None),
    ("max_output_tokens over cap", {**OK, "max_output_tokens": 10**12}, 400, "max_output_tokens", None),
    ("temperature 5", {**OK, "temperature": 5}, 400, "temperature", None),
    ("top_p string", {**OK, "top_p": "high"}, 400, "top_p", None),
    ("stream not a bool", {**OK, "stream": "yes"}, 400, "stream", None),
    (
        "image input part",
        {**OK, "input": [{"role": "user", "content": [{"type": "input_text", "text": "what"}, IMAGE]}]},
        400,
        "input[0].content",
        None,
    ),
    ("bad item type", {**OK, "input": [{"type": "computer_call", "id": "x"}]}, 400, "input[0].type", None),
    (
        "item_reference",
        {**OK, "input": [{"type": "item_reference", "id": "msg_1"}]},
        400,
        "input[0].type",
        None,
    ),
    ("item not an object", {**OK, "input": ["hi"]}, 400, "input[0]", None),
    ("bad role", {**OK, "input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role", None),
    ("message without content", {**OK, "input": [{"role": "user"}]}, 400, "input[0].content", None),
    (
        "function_call without call_id",
        {**OK, "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
        400,
        "input[0].call_id",
        None,
    ),
    (
        "function_call_output for an unknown call",
        {**OK, "input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
        400,
        "input[0].call_id",
        None,
    ),
    ("non-function tool", {**OK, "tools": [{"type": "web_search"}]}, 400, "tools", None),
    (
        "tool without a name",
        {**OK, "tools": [{"type": "function", "parameters": {}}]},
        400,
        "tools[0].name",
        None,
    ),
    (
        "chat-shaped tool",
        {**OK, "tools": [{"type": "function", "function": WEATHER_TOOL}]},
        400,
        "tools",
        None,
    ),
    ("duplicate tool names", {**OK, "tools": [WEATHER_TOOL, WEATHER_TOOL]}, 400, "tools", None),
    (
        "tool_choice unknown function",
        {**OK, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "launch"}},
        400,
        "tool_choice",
        None,
    ),
    ("tool_choice required without tools", {**OK, "tool_choice": "required"}, 400, "tool_choice", None),
    ("text.format bad type", {**OK, "text": {"format": {"type": "xml"}}}, 400, "text.format.type", None),
    (
        "json_schema without schema",
        {**OK, "text": {"format": {"type": "json_schema", "name": "x"}}},
        400,
        "text.format",
        None,
    ),
    ("background", {**OK, "background": True}, 400, "background", None),
    ("metadata not strings", {**OK, "metadata": {"k": 1}}, 400, "metadata.k", None),
    ("metadata too many pairs", {**OK, "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata", None),
    (
        "input over the context",
        {**OK, "input": "hello " * 6000},
        400,
        "input",
        "context_length_exceeded",
    ),
    ("embedding model", {**OK, "model": "embed"}, 400, "model", None),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "code"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input(http: httpx.Client, body: Any, status: int, param: str | None, code: str | None) -> None:
    if isinstance(body, bytes):
        resp = http.post(PATH, content=body, headers={"Content-Type": "application/json"})
    else:
        resp = http.post(PATH, json=body)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    data = resp.json()
    oas.validate("ErrorResponse", data)
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert "Traceback" not in error["message"]


def test_bad_input_messages_are_clear(http: httpx.Client) -> None:
    cases = {c[0]: c[1] for c in BAD_INPUTS}

    def message(case: str) -> str:
        return http.post(PATH, json=cases[case]).json()["error"]["message"]

    assert "vision" in message("image input part")
    assert "computer_call" in message("bad item type") and "function_call_output" in message("bad item type")
    assert "previous_response_id" in message("item_reference")
    assert "top level" in message("chat-shaped tool")
    assert "call_x" in message("function_call_output for an unknown call")
    assert "resp_nope" in message("unknown previous_response_id")
    assert "context length" in message("input over the context")
