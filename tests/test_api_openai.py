"""The OpenAI dialect: pure translation units, then the real daemon driven by the official `openai`
SDK and raw HTTP, every response body and stream chunk validated against the official OpenAPI spec."""

from __future__ import annotations

import importlib.util
import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import mlx_serve_test_raw_reference as raw
import openai
import pytest

from mlx_serve.apis.openai import translate
from mlx_serve.apis.openai.protocol import ChatCompletionRequest, CompletionRequest, Tool
from mlx_serve.engines.types import (
    Finished,
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

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# A worked example SmolLM2 imitates: it answers the next weather question with a get_weather call.
WEATHER_HISTORY = [
    {"role": "user", "content": "What is the weather in Berlin?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C, sunny"},
    {"role": "assistant", "content": "It is 12 C and sunny in Berlin."},
]


def chunks_are_valid(chunks: list[dict[str, Any]], schema: str) -> None:
    """Each chunk matches the spec; finish_reason is null on every choice chunk but the last."""
    for chunk in chunks:
        oas.validate(schema, chunk, stream=True)
    with_choices = [c for c in chunks if c["choices"]]
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    assert with_choices[-1]["choices"][0]["finish_reason"] is not None
    assert len({c["id"] for c in chunks}) == 1


# ---- translation (pure) ----------------------------------------------------------------------


def test_chat_chunker_emits_openai_chunk_sequence() -> None:
    chunker = translate.ChatChunker("m", include_usage=True, logprobs=True, created=1)
    events = [
        ReasoningDelta("thinking"),
        TextDelta("Hi", (TokenLogprob("Hi", -0.5, (("Hi", -0.5), ("Yo", -1.5))),)),
        ToolCallEvent(ToolCall("call_a", "get_weather", '{"city": "Paris"}'), 0),
        ToolCallEvent(ToolCall("call_b", "get_time", "{}"), 1),
        Finished("tool_calls", Usage(10, 5, cached_prompt_tokens=4)),
    ]
    chunks = chunker.start() + [c for e in events for c in chunker.feed(e)]
    chunks_are_valid(chunks, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"reasoning_content": "thinking"}
    assert deltas[2] == {"content": "Hi"}
    assert chunks[2]["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1] == {
        "token": "Yo",
        "logprob": -1.5,
        "bytes": [89, 111],
    }
    head, args = deltas[3]["tool_calls"][0], deltas[4]["tool_calls"][0]
    assert head == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert args == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert deltas[5]["tool_calls"][0]["index"] == 1 and deltas[5]["tool_calls"][0]["id"] == "call_b"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_chat_request_translation() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}],
                },
                {"role": "user", "content": "hi"},
                *WEATHER_HISTORY[1:3],
            ],
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "stop": "END",
            "seed": 3,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
        }
    )
    other = Tool.model_validate({"type": "function", "function": {"name": "get_time"}})
    gen = translate.chat_request(body)
    assert gen.messages is not None and [m.role for m in gen.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
    ]
    assert gen.messages[0].content == "Be brief"
    assert gen.messages[2].tool_calls == (ToolCall("call_1", "get_weather", '{"city": "Berlin"}'),)
    assert gen.messages[3].tool_call_id == "call_1"
    assert gen.tools[0].name == "get_weather" and gen.tools[0].parameters["required"] == ["city"]
    assert gen.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert gen.sampling.max_tokens == 7 and gen.sampling.stop == ("END",) and gen.sampling.seed == 3
    assert gen.response_format == {"type": "json_schema", "schema": {"type": "object"}}
    both = translate.chat_request(body.model_copy(update={"tools": [*(body.tools or []), other]}))
    assert [t.name for t in both.tools] == ["get_weather"]  # a named tool_choice offers only that one
    none = translate.chat_request(body.model_copy(update={"tool_choice": "none"}))
    assert none.tools == () and none.tool_choice is None
    obj = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
        }
    )
    assert translate.chat_request(obj).response_format == {"type": "json_object"}


def test_completion_translation_and_bodies() -> None:
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["def f("], "suffix": "\n    return x", "logprobs": 2, "max_tokens": 3}
    )
    gen = translate.completion_request(body)
    assert (gen.prompt, gen.suffix, gen.messages) == ("def f(", "\n    return x", None)
    assert gen.sampling.logprobs and gen.sampling.top_logprobs == 2
    lps = (TokenLogprob("a", -0.1, (("a", -0.1), ("b", -2.0))), TokenLogprob("bc", -0.3, (("bc", -0.3),)))
    done = Finished("length", Usage(3, 2))
    full = translate.completion_body("cmpl-1", 1, "m", "abc", lps, done)
    oas.validate("CreateCompletionResponse", full)
    assert full["choices"][0]["logprobs"] == {
        "tokens": ["a", "bc"],
        "token_logprobs": [-0.1, -0.3],
        "top_logprobs": [{"a": -0.1, "b": -2.0}, {"bc": -0.3}],
        "text_offset": [0, 1],
    }
    chunker = translate.CompletionChunker("m", include_usage=True, logprobs=False, created=1)
    chunks = [c for e in (TextDelta("ab"), TextDelta("c"), done) for c in chunker.feed(e)]
    chunks_are_valid(chunks, "CreateCompletionResponse")
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "abc"
    chat = translate.chat_completion_body(
        "c",
        1,
        "m",
        "",
        "",
        [ToolCallEvent(ToolCall("i", "f", "{}"))],
        None,
        Finished("tool_calls", Usage(1, 1)),
    )
    oas.validate("CreateChatCompletionResponse", chat)
    assert chat["choices"][0]["message"]["content"] is None


def test_base64_embeddings_round_trip() -> None:
    body = translate.embedding_body("e", [[0.5, -0.25, 1.0]], "base64", 3)
    oas.validate_embeddings(body)
    assert oas.decode_base64_embedding(body["data"][0]["embedding"]) == [0.5, -0.25, 1.0]


# ---- the real daemon -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(daemon):
    with httpx.Client(base_url=daemon.url, timeout=300) as c:
        yield c


def post(http: httpx.Client, path: str, body: dict[str, Any], schema: str) -> dict[str, Any]:
    resp = http.post(path, json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    oas.validate(schema, data)
    return data


def stream(http: httpx.Client, path: str, body: dict[str, Any], schema: str) -> list[dict[str, Any]]:
    """Raw SSE: every event is `data: <json>`, the last is `data: [DONE]`; chunks are validated."""
    with http.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = resp.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    chunks_are_valid(chunks, schema)
    return chunks


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def loaded(daemon) -> set[str]:
    return {m["id"] for m in daemon.get_json("/status")["models"] if m["state"] == "loaded"}


def test_models_list_and_retrieve(daemon, client: openai.OpenAI, http: httpx.Client) -> None:
    before = loaded(daemon)
    body = http.get("/v1/models").json()
    oas.validate("ListModelsResponse", body)
    assert loaded(daemon) == before, "listing models must never load one"
    ids = [m["id"] for m in body["data"]]
    assert {"tiny", "tiny-alias", "smol", "tiny-mlx", "embed"} <= set(ids)
    assert "gpt-4o*" not in ids  # glob aliases are patterns; they show in their model's aliases
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["tiny-alias"]["alias_of"] == "tiny" and "gpt-4o*" in by_id["tiny"]["aliases"]
    assert by_id["embed"]["capabilities"] == ["embedding"]
    assert {m.id for m in client.models.list()} == set(ids)
    got = client.models.retrieve("gpt-4o-mini")
    assert got.id == "gpt-4o-mini" and got.model_extra and got.model_extra["alias_of"] == "tiny"
    oas.validate("Model", http.get("/v1/models/smol").json())
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    oas.validate("ErrorResponse", err.value.response.json())
    assert err.value.response.json()["error"]["code"] == "model_not_found"


def test_chat_plain_and_loaded_model_details(client: openai.OpenAI, http: httpx.Client) -> None:
    out = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=8, temperature=0)
    assert out.model == "tiny" and out.object == "chat.completion"
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.role == "assistant"
    assert out.usage and out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    assert (
        out.usage.prompt_tokens_details is not None
        and out.usage.prompt_tokens_details.cached_tokens is not None
    )
    post(
        http,
        "/v1/chat/completions",
        {"model": "tiny", "messages": user("hi"), "max_tokens": 3},
        "CreateChatCompletionResponse",
    )
    tiny = http.get("/v1/models/tiny").json()
    assert (
        tiny["loaded"]
        and tiny["context_length"] == 2048
        and {"chat", "completion"} <= set(tiny["capabilities"])
    )


def test_smollm2_answers_as_llama_cpp_does(client: openai.OpenAI, smollm2_gguf: Path) -> None:
    question = "What is the capital of France? Answer in one sentence."
    out = client.chat.completions.create(model="smol", messages=user(question), max_tokens=20, temperature=0)
    # Greedy text depends on the CPU's kernels: the reference is llama.cpp itself, on this machine.
    ref = raw.llama_chat(smollm2_gguf, raw.user(question), 20)
    assert out.choices[0].message.content == ref.text and ref.text.strip()
    assert out.choices[0].finish_reason == ref.finish
    assert out.usage and out.usage.prompt_tokens == ref.prompt_tokens
    assert out.usage.completion_tokens == ref.completion_tokens


def test_chat_stream_with_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "messages": user("hi"),
        "max_tokens": 6,
        "stream_options": {"include_usage": True},
    }
    chunks = stream(http, "/v1/chat/completions", body, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert "cached_tokens" in chunks[-1]["usage"]["prompt_tokens_details"]
    assert all("usage" not in c for c in chunks[:-1])
    sdk = list(
        client.chat.completions.create(
            model="tiny",
            messages=user("hi"),
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert sdk[-1].usage is not None and sdk[-1].usage.total_tokens == sdk[-1].usage.prompt_tokens + 6
    text = "".join(c.choices[0].delta.content or "" for c in sdk if c.choices)
    plain = stream(
        http,
        "/v1/chat/completions",
        {"model": "tiny", "messages": user("hi"), "max_tokens": 6},
        "CreateChatCompletionStreamResponse",
    )
    assert plain[-1]["choices"] and "usage" not in plain[-1]  # no usage chunk unless asked for
    assert text


@pytest.mark.parametrize("name", ["tiny-alias", "gpt-4o-mini", "gpt-4o"])
def test_alias_and_glob_alias_resolve(client: openai.OpenAI, name: str) -> None:
    out = client.chat.completions.create(model=name, messages=user("hi"), max_tokens=2)
    assert out.model == "tiny"


def test_stop_and_length(client: openai.OpenAI) -> None:
    def run(**kw: Any) -> Any:
        return client.chat.completions.create(
            model="tiny", messages=user("tell me"), temperature=0, **kw
        ).choices[0]

    first, again = run(max_tokens=16), run(max_tokens=16)
    assert first.message.content == again.message.content and first.finish_reason == "length"
    text = first.message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    assert cut > 0
    stopped = run(max_tokens=16, stop=[stop, "never-appears"])
    assert stopped.finish_reason == "stop" and stopped.message.content == text[:cut]
    short = run(max_completion_tokens=3)
    assert short.finish_reason == "length"


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.chat.completions.create(
            model="tiny", messages=user("hi"), max_tokens=12, temperature=1.0, seed=seed
        )
        return out.choices[0].message.content or ""

    assert sample(42) == sample(42)
    assert sample(42) != sample(7)


def test_chat_logprobs(http: httpx.Client) -> None:
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 5, "logprobs": True, "top_logprobs": 3}
    data = post(http, "/v1/chat/completions", body, "CreateChatCompletionResponse")
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"] == 5
    for item in content:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 3
        assert item["top_logprobs"][0]["logprob"] >= item["logprob"] - 1e-6
        assert bytes(item["bytes"]).decode("utf-8", "replace") == item["token"]
    chunks = stream(http, "/v1/chat/completions", body, "CreateChatCompletionStreamResponse")
    streamed = [lp for c in chunks for lp in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert len(streamed) == 5
    plain = post(
        http,
        "/v1/chat/completions",
        {**body, "logprobs": False, "top_logprobs": None},
        "CreateChatCompletionResponse",
    )
    assert plain["choices"][0]["logprobs"] is None


def test_tool_results_are_accepted_and_answered(client: openai.OpenAI, http: httpx.Client) -> None:
    messages = [*WEATHER_HISTORY[:3]]
    out = client.chat.completions.create(
        model="smol", messages=messages, tools=[WEATHER_TOOL], max_tokens=24, temperature=0
    )
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    body = {
        "model": "smol",
        "messages": messages,
        "tools": [WEATHER_TOOL],
        "max_tokens": 8,
        "tool_choice": "auto",
    }
    post(http, "/v1/chat/completions", body, "CreateChatCompletionResponse")


def test_model_tool_call_non_streaming_and_streamed_deltas(
    client: openai.OpenAI, http: httpx.Client, smollm2_gguf: Path
) -> None:
    body = {
        "model": "smol",
        "messages": [*WEATHER_HISTORY, *user("What is the weather in Madrid?")],
        "tools": [WEATHER_TOOL],
        "max_tokens": 60,
        "temperature": 0,
    }
    data = post(http, "/v1/chat/completions", body, "CreateChatCompletionResponse")
    choice = data["choices"][0]
    # Whether SmolLM2 calls the tool, and with what, is its greedy text on this CPU: llama.cpp's own.
    ref = raw.llama_request(smollm2_gguf, translate.chat_request(ChatCompletionRequest.model_validate(body)))
    assert data["usage"]["prompt_tokens"] == ref.prompt_tokens
    expected = ref.tool_call()
    if expected is None:
        assert (choice["message"]["content"], choice["finish_reason"]) == (ref.text, ref.finish)
        pytest.skip(f"SmolLM2 on this CPU answers without a tool call: {ref.text!r}")
    assert choice["finish_reason"] == "tool_calls", choice
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == expected["name"]
    assert json.loads(call["function"]["arguments"]) == expected["arguments"]
    chunks = stream(http, "/v1/chat/completions", body, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": expected["name"], "arguments": ""}
    assert json.loads("".join(c["function"].get("arguments", "") for c in calls)) == expected["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # The SDK assembles the streamed call; then the tool result goes back and gets an answer.
    sdk = client.chat.completions.create(**{**body, "stream": True})
    parts = [d for c in sdk if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    call_id = parts[0].id
    arguments = "".join(p.function.arguments or "" for p in parts if p.function)
    follow = body["messages"] + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "30 C, clear sky"},
    ]
    answer = client.chat.completions.create(
        model="smol", messages=follow, tools=[WEATHER_TOOL], max_tokens=30, temperature=0
    )
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_completions_plain_and_streaming(client: openai.OpenAI, http: httpx.Client) -> None:
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage and out.usage.completion_tokens == 7
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0, "logprobs": 2}
    data = post(http, "/v1/completions", body, "CreateCompletionResponse")
    assert data["choices"][0]["text"] == out.choices[0].text
    lp = data["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 7
    chunks = stream(
        http,
        "/v1/completions",
        {**body, "stream_options": {"include_usage": True}},
        "CreateCompletionResponse",
    )
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == out.choices[0].text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    sdk = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0, stream=True
        )
        if c.choices
    )
    assert sdk == out.choices[0].text


def test_embeddings_float_and_base64(client: openai.OpenAI, http: httpx.Client) -> None:
    texts = ["hello world", "the capital of France"]
    floats = post(
        http,
        "/v1/embeddings",
        {"model": "embed", "input": texts, "encoding_format": "float"},
        "CreateEmbeddingResponse",
    )
    b64 = http.post(
        "/v1/embeddings", json={"model": "embed", "input": texts, "encoding_format": "base64"}
    ).json()
    oas.validate_embeddings(b64)
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["usage"]["prompt_tokens"] > 0
    for plain, packed in zip(floats["data"], b64["data"], strict=True):
        decoded = oas.decode_base64_embedding(packed["embedding"])
        assert len(decoded) == len(plain["embedding"])
        assert all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
            for a, b in zip(decoded, plain["embedding"], strict=True)
        )
        assert math.isclose(math.fsum(x * x for x in plain["embedding"]), 1.0, rel_tol=1e-4)
    sdk = client.embeddings.create(
        model="embed", input="hello world"
    )  # the SDK asks for base64 and decodes it
    assert all(
        math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
        for a, b in zip(sdk.data[0].embedding, floats["data"][0]["embedding"], strict=True)
    )


# ---- bad input -------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
OK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_INPUTS: list[tuple[str, str, Any, int, str | None, str | None]] = [
    # (case, path, body (dict, or raw bytes), status, param, code)
    ("malformed json", CHAT, b'{"model": "tiny", "messages": [', 400, None, None),
    ("body not an object", CHAT, b'["model", "tiny"]', 400, None, None),
    ("empty body", CHAT, b"", 400, None, None),
    (
        "NaN temperature",
        CHAT,
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        None,
        None,
    ),
    ("model not a string", CHAT, {**OK, "model": 5}, 400, "model", None),
    ("missing messages", CHAT, {"model": "tiny"}, 400, "messages", None),
    ("empty messages", CHAT, {**OK, "messages": []}, 400, "messages", None),
    ("messages not a list", CHAT, {**OK, "messages": "hi"}, 400, "messages", None),
    ("negative temperature", CHAT, {**OK, "temperature": -0.5}, 400, "temperature", None),
    ("huge temperature", CHAT, {**OK, "temperature": 1e300}, 400, "temperature", None),
    ("string temperature", CHAT, {**OK, "temperature": "hot"}, 400, "temperature", None),
    ("top_p zero", CHAT, {**OK, "top_p": 0}, 400, "top_p", None),
    ("n=2", CHAT, {**OK, "n": 2}, 400, "n", None),
    ("max_tokens zero", CHAT, {**OK, "max_tokens": 0}, 400, "max_tokens", None),
    ("max_tokens float", CHAT, {**OK, "max_tokens": 2.5}, 400, "max_tokens", None),
    ("max_tokens over cap", CHAT, {**OK, "max_tokens": 10**12}, 400, "max_tokens", None),
    (
        "max_completion_tokens negative",
        CHAT,
        {**OK, "max_completion_tokens": -1},
        400,
        "max_completion_tokens",
        None,
    ),
    ("presence_penalty too big", CHAT, {**OK, "presence_penalty": 2.5}, 400, "presence_penalty", None),
    ("seed not an int", CHAT, {**OK, "seed": 1.5}, 400, "seed", None),
    ("top_logprobs 21", CHAT, {**OK, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ("top_logprobs without logprobs", CHAT, {**OK, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("logprobs not a bool", CHAT, {**OK, "logprobs": "yes"}, 400, "logprobs", None),
    ("unknown model", CHAT, {**OK, "model": "no-such-model"}, 404, "model", "model_not_found"),
    (
        "image content",
        CHAT,
        {
            **OK,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ],
        },
        400,
        "messages[0].content",
        None,
    ),
    (
        "bad role",
        CHAT,
        {**OK, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
        None,
    ),
    ("user message without content", CHAT, {**OK, "messages": [{"role": "user"}]}, 400, "messages[0]", None),
    (
        "tool message without tool_call_id",
        CHAT,
        {**OK, "messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages[0]",
        None,
    ),
    ("too many stop strings", CHAT, {**OK, "stop": [f"s{i}" for i in range(17)]}, 400, "stop", None),
    ("stop not a string", CHAT, {**OK, "stop": 5}, 400, "stop", None),
    ("empty stop string", CHAT, {**OK, "stop": [""]}, 400, "stop", None),
    ("tools not a list", CHAT, {**OK, "tools": {"type": "function"}}, 400, "tools", None),
    (
        "tool without a name",
        CHAT,
        {**OK, "tools": [{"type": "function", "function": {"description": "x"}}]},
        400,
        "tools[0].function.name",
        None,
    ),
    (
        "tool_choice unknown function",
        CHAT,
        {**OK, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "launch"}}},
        400,
        "tool_choice",
        None,
    ),
    (
        "tool_choice bad string",
        CHAT,
        {**OK, "tools": [WEATHER_TOOL], "tool_choice": "always"},
        400,
        "tool_choice",
        None,
    ),
    ("tool_choice required without tools", CHAT, {**OK, "tool_choice": "required"}, 400, "tool_choice", None),
    (
        "response_format bad type",
        CHAT,
        {**OK, "response_format": {"type": "xml"}},
        400,
        "response_format.type",
        None,
    ),
    (
        "json_schema without schema",
        CHAT,
        {**OK, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        400,
        "response_format",
        None,
    ),
    (
        "json_schema missing object",
        CHAT,
        {**OK, "response_format": {"type": "json_schema"}},
        400,
        "response_format",
        None,
    ),
    (
        "stream_options not an object",
        CHAT,
        {**OK, "stream": True, "stream_options": True},
        400,
        "stream_options",
        None,
    ),
    (
        "prompt over the context",
        CHAT,
        {**OK, "messages": [{"role": "user", "content": "hello " * 6000}]},
        400,
        None,
        "context_length_exceeded",
    ),
    ("chat on an embedding model", CHAT, {**OK, "model": "embed"}, 400, "model", None),
    (
        "completion prompt over the context",
        "/v1/completions",
        {"model": "tiny", "prompt": "hello " * 6000},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "embedding input over the context",
        "/v1/embeddings",
        {"model": "embed", "input": ["short", "hello " * 6000]},
        400,
        "input",
        "context_length_exceeded",
    ),
    ("completion without prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt", None),
    (
        "completion token-id prompt",
        "/v1/completions",
        {"model": "tiny", "prompt": [1, 2, 3]},
        400,
        "prompt",
        None,
    ),
    ("completion echo", "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo", None),
    (
        "suffix on a model without FIM tokens",
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "suffix": "y", "max_tokens": 2},
        400,
        None,
        None,
    ),
    ("embeddings empty input", "/v1/embeddings", {"model": "embed", "input": []}, 400, "input", None),
    (
        "embeddings bad encoding",
        "/v1/embeddings",
        {"model": "embed", "input": "x", "encoding_format": "hex"},
        400,
        "encoding_format",
        None,
    ),
    ("embeddings on a chat model", "/v1/embeddings", {"model": "tiny", "input": "x"}, 400, "model", None),
    (
        "embeddings unknown model",
        "/v1/embeddings",
        {"model": "nope", "input": "x"},
        404,
        "model",
        "model_not_found",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input(
    http: httpx.Client, path: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    if isinstance(body, bytes):
        resp = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    data = resp.json()
    oas.validate("ErrorResponse", data)
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert "Traceback" not in error["message"] and "/home/" not in error["message"]


def test_bad_input_messages_are_clear(http: httpx.Client) -> None:
    n2 = http.post(CHAT, json={**OK, "n": 2}).json()["error"]["message"]
    assert "n=1" in n2
    cases = {c[0]: c[2] for c in BAD_INPUTS}
    image = http.post(CHAT, json=cases["image content"]).json()["error"]["message"]
    assert "image" in image and "vision" in image
    overflow = http.post(CHAT, json=cases["prompt over the context"]).json()["error"]["message"]
    assert "context length" in overflow


def test_oversized_body_is_413(daemon) -> None:
    body = json.dumps({**OK, "messages": [{"role": "user", "content": "a" * (17 * 2**20)}]}).encode()
    with httpx.Client(base_url=daemon.url, timeout=60) as c:
        resp = c.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    oas.validate("ErrorResponse", resp.json())
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    post(
        http,
        CHAT,
        {**OK, "frobnicate": {"x": 1}, "metadata": {"a": "b"}, "store": False},
        "CreateChatCompletionResponse",
    )


# ---- client disconnect (production runner) ---------------------------------------------------


def _start_request(daemon, body: dict[str, Any]) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_frees_the_model(daemon, client: openai.OpenAI, streaming: bool) -> None:
    """tiny never emits EOS: 2000 tokens keep it busy for many seconds unless the disconnect
    cancels the generation (the model serves one request at a time)."""
    started = time.monotonic()
    client.chat.completions.create(model="tiny", messages=user("warm"), max_tokens=200)
    full_run = (time.monotonic() - started) * 10  # what 2000 tokens would take
    sock = _start_request(daemon, {**OK, "max_tokens": 2000, "stream": streaming})
    if streaming:
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(65536)
    else:
        time.sleep(1.0)
    sock.close()
    started = time.monotonic()
    out = client.chat.completions.create(model="tiny", messages=user("next"), max_tokens=4)
    elapsed = time.monotonic() - started
    assert out.choices[0].finish_reason == "length"
    assert elapsed < full_run / 2, (
        f"the next request waited {elapsed:.1f}s (a full abandoned run takes ~{full_run:.1f}s): it kept running"
    )


# ---- fill-in-the-middle ----------------------------------------------------------------------

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def test_completion_with_suffix_on_a_fim_model(start_daemon, tiny_mlx: Path, tmp_path: Path) -> None:
    """The tiny MLX model with three unused special tokens renamed to StarCoder's FIM tokens."""
    folder = tmp_path / "tiny-fim"
    folder.mkdir()
    renames = dict(zip(("<jupyter_output>", "<jupyter_script>", "<empty_output>"), FIM_TOKENS, strict=True))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (tiny_mlx / name).read_text()
        for old, new in renames.items():
            text = text.replace(f'"{old}"', f'"{new}"')
        (folder / name).write_text(text)
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(tiny_mlx / name)
    daemon = start_daemon({"fim": {"source": str(folder), "engine": "mlx"}})
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0, timeout=300)
    prefix, suffix = "def add(a, b):\n    c = ", "\n    return c\n"
    plain = client.completions.create(model="fim", prompt=prefix, max_tokens=4, temperature=0)
    filled = client.completions.create(model="fim", prompt=prefix, suffix=suffix, max_tokens=4, temperature=0)
    oas.validate("CreateCompletionResponse", filled.model_dump(exclude_unset=True))
    assert filled.choices[0].finish_reason == "length" and filled.usage and plain.usage
    assert filled.usage.completion_tokens == 4
    # The suffix and the three FIM tokens went into the prompt.
    assert filled.usage.prompt_tokens >= plain.usage.prompt_tokens + 3 + 4
    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        assert "fim" in http.get("/v1/models/fim").json()["capabilities"]
