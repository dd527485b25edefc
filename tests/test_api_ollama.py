"""The Ollama dialect: pure translation units, then the real daemon through the official `ollama`
client and raw HTTP (NDJSON framing, error shapes)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import httpx
import mlx_serve_test_raw_reference as raw
import ollama
import pytest

import mlx_serve_test_harness as harness
from mlx_serve.apis.body import validate
from mlx_serve.apis.errors import RequestError
from mlx_serve.apis.ollama import catalog, translate
from mlx_serve.apis.ollama.protocol import ChatRequest, GenerateRequest, Options
from mlx_serve.engines.types import (
    EngineInfo,
    Finished,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallEvent,
    Usage,
)

CAPITAL = [{"role": "user", "content": "Which city is the capital of France?"}]

# ---- translation (no daemon) -------------------------------------------------------------------


def test_options_map_to_internal_sampling() -> None:
    opts = validate(
        Options,
        {
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 20,
            "min_p": 0.1,
            "num_predict": 7,
            "stop": ["\n\n"],
            "seed": 42,
            "repeat_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "num_ctx": 4096,
            "mirostat": 2,  # unknown to us: ignored
        },
    )
    s = translate.sampling_from(opts, logprobs=False, top_logprobs=3)
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.2, 0.9, 20, 0.1)
    assert (s.max_tokens, s.stop, s.seed, s.repetition_penalty) == (7, ("\n\n",), 42, 1.1)
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -0.5)
    assert s.logprobs and s.top_logprobs == 3
    unlimited = translate.sampling_from(validate(Options, {"num_predict": -1, "seed": -1, "stop": "x"}))
    assert unlimited.max_tokens is None and unlimited.seed is None and unlimited.stop == ("x",)


def test_chat_tool_history_translates_with_object_arguments() -> None:
    req = validate(
        ChatRequest,
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "thinking": "look it up",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
                },
                {"role": "tool", "content": "18C", "tool_name": "get_weather"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
            ],
            "format": {"type": "object", "properties": {"a": {"type": "string"}}},
            "think": "high",
        },
    )
    gen = translate.chat_request(req)
    assert gen.messages is not None and len(gen.messages) == 3
    call = gen.messages[1].tool_calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert gen.messages[1].reasoning == "look it up"
    assert gen.messages[2].role == "tool" and gen.messages[2].name == "get_weather"
    assert gen.tools[0].name == "get_weather" and gen.tools[0].parameters == {"type": "object"}
    assert gen.response_format == {"type": "json_schema", "schema": req.format}
    assert gen.enable_thinking is True
    assert (
        translate.chat_request(validate(ChatRequest, {"model": "m", "messages": CAPITAL})).enable_thinking
        is None
    )
    assert translate.response_format("json") == {"type": "json_object"}
    assert translate.response_format("") is None


def test_tool_call_events_become_object_arguments() -> None:
    event = ToolCallEvent(ToolCall("call_1", "get_weather", '{"city":"Paris"}'), index=0)
    chunk = translate.event_chunk("chat", "m", event)
    assert chunk is not None
    assert chunk["message"]["tool_calls"] == [
        {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert translate.event_chunk("generate", "m", event) is None  # /api/generate has no tools


def test_generate_modes() -> None:
    templated = translate.generate_request(
        validate(GenerateRequest, {"model": "m", "prompt": "hi", "system": "be brief"})
    )
    assert [(m.role, m.content) for m in templated.messages or ()] == [("system", "be brief"), ("user", "hi")]
    raw = translate.generate_request(validate(GenerateRequest, {"model": "m", "prompt": "hi", "raw": True}))
    assert raw.prompt == "hi" and raw.messages is None and raw.suffix is None
    fim = translate.generate_request(validate(GenerateRequest, {"model": "m", "prompt": "a(", "suffix": ")"}))
    assert (fim.prompt, fim.suffix) == ("a(", ")")


def test_chunks_and_done_fields() -> None:
    finished = Finished("length", Usage(prompt_tokens=5, completion_tokens=3))
    timings = translate.Timings.from_seconds(2.0, 0.5, 0.25, 1.25)
    done = translate.final_chunk("chat", "tiny:latest", finished, timings)
    assert done["done"] is True and done["done_reason"] == "length"
    assert done["message"] == {"role": "assistant", "content": ""}
    assert (done["prompt_eval_count"], done["eval_count"]) == (5, 3)
    assert (done["total_duration"], done["load_duration"]) == (2_000_000_000, 500_000_000)
    assert (done["prompt_eval_duration"], done["eval_duration"]) == (250_000_000, 1_250_000_000)
    assert datetime.fromisoformat(done["created_at"]).tzinfo is not None
    assert translate.done_reason(Finished("tool_calls", finished.usage)) == "stop"
    assert translate.Timings.from_seconds(0, 0, 0, 0).eval_ns == 1  # never 0: clients divide by it
    text = translate.event_chunk(
        "generate", "m", TextDelta("Hi", (TokenLogprob("Hi", -0.1, (("Hi", -0.1),)),))
    )
    assert text == {
        "model": "m",
        "created_at": text["created_at"],
        "response": "Hi",
        "done": False,
        "logprobs": [{"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1}]}],
    }
    thinking = translate.event_chunk("chat", "m", ReasoningDelta("hmm"))
    assert thinking is not None and thinking["message"]["thinking"] == "hmm"
    assert translate.event_chunk("chat", "m", TextDelta("")) is None


def test_keep_alive_and_embedding_dimensions() -> None:
    assert translate.keep_alive_seconds(None, 300.0) == 300.0  # absent: the profile's ttl
    assert translate.keep_alive_seconds("10m", 300.0) == 600.0
    assert translate.keep_alive_seconds(0, None) == 0.0
    assert translate.keep_alive_seconds(-1, 300.0) is None
    assert translate.keep_alive_seconds("-1m", 300.0) is None
    assert translate.shorten([[3.0, 4.0, 12.0]], 2) == [[0.6, 0.8]]
    with pytest.raises(RequestError, match="dimensions"):
        translate.shorten([[1.0]], 2)


def test_catalog_names_and_fim_template() -> None:
    assert catalog.tagged("tiny") == "tiny:latest"
    assert catalog.tagged("qwen:7b") == "qwen:7b"
    assert catalog.tagged("org/model") == "org/model:latest"
    assert catalog.listed_names("tiny", ["tiny-alias", "gpt-4o*"]) == ["tiny", "tiny-alias"]
    assert (
        catalog.parameter_size(134_515_008) == "134.52M" and catalog.parameter_size(8_030_261_248) == "8.0B"
    )
    info = EngineInfo(
        context_length=4096,
        capabilities=frozenset({"completion", "chat", "tools", "fim"}),
        engine="llama_cpp",
        fim_tokens=("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
        chat_template="{{ messages }}",
    )
    facts = catalog.with_engine(catalog.ModelFacts(known=True, format="gguf"), info)
    assert catalog.capabilities(facts.capabilities) == ["completion", "tools", "insert"]
    template = catalog.go_template(facts)
    assert (
        ".Suffix" in template and "<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>" in template
    )
    plain = catalog.with_engine(facts, EngineInfo(4096, frozenset({"embedding"}), "llama_cpp"))
    assert ".Suffix" not in catalog.go_template(plain) and catalog.capabilities(plain.capabilities) == [
        "embedding"
    ]


# ---- the real daemon ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url, timeout=120)


@pytest.fixture(scope="module")
def http(daemon):
    with httpx.Client(base_url=daemon.url, timeout=120) as c:
        yield c


def test_root_and_version(http: httpx.Client) -> None:
    r = http.get("/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert http.head("/").status_code == 200
    version = http.get("/api/version").json()["version"]
    assert tuple(int(x) for x in version.split(".")) >= (0, 6, 4)


def test_list_every_model_and_alias(client: ollama.Client, http: httpx.Client) -> None:
    names = [m.model for m in client.list().models]
    assert names == [
        "tiny:latest",
        "tiny-alias:latest",
        "smol:latest",
        "tiny-mlx:latest",
        "embed:latest",
        "fim:latest",
    ]
    raw = {m["name"]: m for m in http.get("/api/tags").json()["models"]}
    smol = raw["smol:latest"]
    assert smol["model"] == "smol:latest" and smol["size"] > 90_000_000 and len(smol["digest"]) == 64
    assert smol["details"]["format"] == "gguf" and smol["details"]["family"] == "llama"
    assert smol["details"]["quantization_level"] == "Q4_1" and smol["details"]["parameter_size"] == "134.52M"
    assert raw["tiny-mlx:latest"]["details"]["format"] == "mlx" and raw["tiny-mlx:latest"]["size"] > 0
    datetime.fromisoformat(smol["modified_at"])


def test_show(client: ollama.Client, http: httpx.Client) -> None:
    smol = client.show("smol:latest")
    assert smol.capabilities == ["completion", "tools"]
    assert smol.modelinfo is not None and smol.modelinfo["llama.context_length"] == 8192
    assert smol.template is not None and "<|im_start|>" in smol.template and ".Suffix" not in smol.template
    assert smol.details is not None and smol.details.family == "llama"
    assert "num_ctx" in (smol.parameters or "")
    embed = http.post("/api/show", json={"name": "embed"}).json()  # the older `name` field
    assert embed["capabilities"] == ["embedding"]
    mlx = client.show("tiny-mlx")
    assert mlx.details is not None and mlx.details.format == "mlx"
    assert mlx.modelinfo is not None and mlx.modelinfo["llama.context_length"] == 2048


def test_chat_answers_as_llama_cpp_does(client: ollama.Client, smollm2_gguf) -> None:
    r = client.chat("smol", messages=CAPITAL, options={"temperature": 0, "num_predict": 16})
    ref = raw.llama_chat(smollm2_gguf, raw.user(CAPITAL[0]["content"]), 16)
    assert r.message.content == ref.text and r.message.content  # the model's own greedy answer
    assert r.message.role == "assistant" and r.done and r.done_reason == ref.finish
    assert r.prompt_eval_count == ref.prompt_tokens and r.eval_count == ref.completion_tokens
    assert r.total_duration and r.eval_duration and r.prompt_eval_duration
    assert r.total_duration >= r.eval_duration


def test_generate_answers_as_llama_cpp_does_templated_and_raw(client: ollama.Client, smollm2_gguf) -> None:
    r = client.generate("smol", CAPITAL[0]["content"], options={"temperature": 0, "num_predict": 16})
    ref = raw.llama_chat(smollm2_gguf, raw.user(CAPITAL[0]["content"]), 16)
    assert r.response == ref.text and r.done_reason == ref.finish  # templated: the chat answer
    prompt = "The capital of France is"
    untemplated = client.generate("smol", prompt, raw=True, options={"temperature": 0, "num_predict": 3})
    ref = raw.llama_greedy(smollm2_gguf, prompt, 3)
    assert untemplated.response == ref.text and untemplated.prompt_eval_count == ref.prompt_tokens == 5


def test_chat_stream(client: ollama.Client, smollm2_gguf) -> None:
    chunks = list(
        client.chat("smol", messages=CAPITAL, stream=True, options={"temperature": 0, "num_predict": 16})
    )
    ref = raw.llama_chat(smollm2_gguf, raw.user(CAPITAL[0]["content"]), 16)
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert chunks[-1].message.content == "" and chunks[-1].done_reason == ref.finish
    text = "".join(c.message.content or "" for c in chunks)
    assert text == ref.text and len(chunks) >= 4
    assert chunks[-1].eval_count == ref.completion_tokens


def test_num_predict_ends_with_length(client: ollama.Client) -> None:
    r = client.generate("tiny", "hello", options={"num_predict": 9})
    assert r.done_reason == "length" and r.eval_count == 9
    chunks = list(client.chat("tiny-alias:latest", messages=CAPITAL, stream=True, options={"num_predict": 6}))
    assert chunks[-1].done_reason == "length" and chunks[-1].eval_count == 6
    assert chunks[-1].model == "tiny-alias:latest"


def test_mlx_engine_chat(client: ollama.Client) -> None:
    r = client.chat("tiny-mlx:latest", messages=CAPITAL, options={"num_predict": 5})
    assert r.done_reason == "length" and r.eval_count == 5 and r.message.content


def test_ndjson_framing(http: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": "hello", "options": {"num_predict": 4}}
    with http.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [x["done"] for x in lines] == [False] * 4 + [True]
    assert lines[-1]["eval_count"] == 4 and lines[-1]["response"] == ""
    assert all(
        isinstance(lines[-1][k], int) and lines[-1][k] > 0 for k in ("total_duration", "eval_duration")
    )
    whole = http.post("/api/generate", json={**body, "stream": False}).json()
    assert whole["done"] and whole["response"] and whole["eval_count"] == 4


def test_tools_history_round_trip(client: ollama.Client) -> None:
    """A conversation carrying a tool call (object arguments) and its result reaches the model."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
    ]
    r = client.chat("smol", messages=messages, tools=tools, options={"temperature": 0, "num_predict": 24})
    assert r.done and r.prompt_eval_count and r.prompt_eval_count > 100  # the tool prompt was rendered
    assert r.message.content or r.message.tool_calls


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    r = client.embed("embed", input=["hello world", "goodbye"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 64
    assert abs(sum(x * x for x in r.embeddings[0]) - 1.0) < 1e-3
    assert r.embeddings[0] != r.embeddings[1]
    one = client.embed("embed:latest", input="hello world")
    assert one.embeddings[0] == pytest.approx(r.embeddings[0], abs=1e-5)
    short = client.embed("embed", input="hello world", dimensions=8)
    assert len(short.embeddings[0]) == 8 and abs(sum(x * x for x in short.embeddings[0]) - 1.0) < 1e-3
    legacy = client.embeddings("embed", prompt="hello world")
    assert list(legacy.embedding) == pytest.approx(r.embeddings[0], abs=1e-5)


def test_fim_model_advertises_insert_and_suffix_template(client: ollama.Client) -> None:
    """Continue enables fill-in-the-middle only when /api/show's template mentions .Suffix."""
    fim = client.show("fim:latest")
    assert fim.capabilities == ["completion", "tools", "insert"]
    assert fim.template is not None and "{{ .Suffix }}" in fim.template
    assert "<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>" in fim.template


def test_generate_with_suffix_fills_the_middle(client: ollama.Client, http: httpx.Client) -> None:
    r = client.generate(
        "fim", "def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))\n", options={"num_predict": 7}
    )
    assert r.done_reason == "length" and r.eval_count == 7 and r.response
    # the FIM prompt is built from the model's tokens, not the chat template: far fewer prompt tokens
    chat = client.generate("fim", "def add(a, b):\n    return ", options={"num_predict": 1})
    assert r.prompt_eval_count and chat.prompt_eval_count and r.prompt_eval_count < chat.prompt_eval_count
    body = {"model": "fim", "prompt": "x = ", "suffix": "\n", "options": {"num_predict": 3}}
    with http.stream("POST", "/api/generate", json=body) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert resp.status_code == 200 and lines[-1]["done"] and lines[-1]["eval_count"] == 3
    # an empty prompt with a suffix is a completion at the top of a file, not a load request
    top = client.generate("fim", "", suffix="\nimport os\n", options={"num_predict": 2})
    assert top.done_reason == "length" and top.eval_count == 2


def test_suffix_on_a_model_without_fim_is_a_clear_400(http: httpx.Client) -> None:
    r = http.post(
        "/api/generate", json={"model": "smol", "prompt": "def f(", "suffix": "):", "stream": False}
    )
    assert r.status_code == 400 and r.json() == {"error": r.json()["error"]}
    assert "fill-in-the-middle" in r.json()["error"]


def test_ps_lists_loaded_models(client: ollama.Client) -> None:
    client.generate("tiny", "hi", options={"num_predict": 1})
    models = {m.model: m for m in client.ps().models}
    tiny = models["tiny:latest"]
    assert tiny.size and tiny.size > 20_000_000 and tiny.context_length == 2048
    assert tiny.expires_at is not None and tiny.expires_at.year > 2100  # profile ttl "forever"
    assert tiny.details is not None and tiny.details.family == "llama"


BAD_INPUTS = [
    # (path, raw body or JSON value, status, words the message must contain)
    ("/api/chat", b"{not json", 400, "not valid JSON"),
    ("/api/chat", b"[1, 2]", 400, "JSON object"),
    ("/api/chat", b"", 400, "empty"),
    ("/api/chat", {"messages": CAPITAL}, 400, "model"),
    ("/api/chat", {"model": "", "messages": CAPITAL}, 400, "model"),
    ("/api/chat", {"model": "no-such-model", "messages": CAPITAL}, 404, "no-such-model"),
    ("/api/chat", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "stream": "yes"}, 400, "stream"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "options": {"num_predict": -5}}, 400, "num_predict"),
    ("/api/chat", b'{"model": "tiny", "options": {"temperature": NaN}}', 400, "NaN"),
    (
        "/api/chat",
        {"model": "tiny", "messages": CAPITAL, "options": {"temperature": "hot"}},
        400,
        "temperature",
    ),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "options": {"temperature": 9}}, 400, "temperature"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "options": {"num_ctx": 10**9}}, 400, "num_ctx"),
    (
        "/api/chat",
        {"model": "tiny", "messages": CAPITAL, "options": {"num_predict": 10**7}},
        400,
        "max_tokens",
    ),
    (
        "/api/chat",
        {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
        400,
        "images",
    ),
    ("/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "format": "xml"}, 400, "format"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "format": 5}, 400, "format"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "format": {"foo": 1}}, 400, "JSON schema"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "keep_alive": "banana"}, 400, "keep_alive"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "keep_alive": [5]}, 400, "keep_alive"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "top_logprobs": 99}, 400, "top_logprobs"),
    ("/api/chat", {"model": "tiny", "messages": CAPITAL, "think": "maybe"}, 400, "think"),
    (
        "/api/chat",
        {
            "model": "tiny",
            "messages": [
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}
            ],
        },
        400,
        "arguments",
    ),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "tool", "content": "18C"}]}, 400, "tool"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": [1, 2, 3]}, 400, "context"),
    ("/api/embed", {"model": "embed", "input": ["a", 1]}, 400, "input"),
    ("/api/embed", {"model": "tiny", "input": "a"}, 400, "embedding"),
    ("/api/embeddings", {"model": "nope", "prompt": "a"}, 404, "nope"),
    ("/api/show", {}, 400, "model"),
    ("/api/show", {"model": "../etc/passwd"}, 404, "passwd"),
    ("/api/pull", {"model": "llama3"}, 501, "profile"),
    ("/api/nothing-here", {}, 404, "no such endpoint"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"), BAD_INPUTS, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_INPUTS)]
)
def test_bad_inputs(http: httpx.Client, path: str, body: object, status: int, words: str) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    data = r.json()
    assert set(data) == {"error"} and isinstance(data["error"], str)
    assert words.lower() in data["error"].lower()
    assert "/root" not in data["error"] and "/home" not in data["error"]  # no local paths


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = b'{"model": "tiny", "prompt": "' + b"a" * (17 * 1024 * 1024) + b'"}'
    r = http.post("/api/generate", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and set(r.json()) == {"error"}


def test_client_error_shape(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat("no-such-model", messages=CAPITAL)
    assert exc.value.status_code == 404 and "no-such-model" in exc.value.error


# ---- model lifecycle on a private daemon (keep_alive, load/unload calls, nothing loads by listing),
# serving under an API prefix as a bonus -----------------------------------------------------------


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory, api_models: dict[str, dict]):
    home = tmp_path_factory.mktemp("ollama-lifecycle")
    models = {
        "tiny": {**api_models["tiny"], "ttl": "1h"},
        "tiny-mlx": api_models["tiny-mlx"],
        "ghost": {"source": str(home / "missing" / "ghost.gguf"), "engine": "llama_cpp"},
    }
    (home / "config.toml").write_text(harness.profile_text(models, apis={"prefix": "/llm"}))
    proc = harness.Daemon(home / "config.toml", home).start()
    yield proc, ollama.Client(host=proc.url + "/llm", timeout=120)
    proc.stop()


def _loaded(client: ollama.Client) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.model or "": m for m in client.ps().models}


def _wait_unloaded(client: ollama.Client, name: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while name in _loaded(client):
        assert time.monotonic() < deadline, f"{name} still loaded after {timeout}s"
        time.sleep(0.1)


def test_listing_and_show_never_load(private) -> None:
    proc, client = private
    assert httpx.get(proc.url + "/llm/").text == "Ollama is running"
    client.list()
    client.show("tiny")
    client.show("tiny-mlx")
    assert _loaded(client) == {}


def test_load_and_unload_requests(private) -> None:
    _, client = private
    r = client.generate("tiny", "")
    assert r.done and r.done_reason == "load" and "tiny:latest" in _loaded(client)
    r = client.generate("tiny", "", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    assert "tiny:latest" not in _loaded(client)
    r = client.chat("tiny-mlx:latest", messages=[])
    assert r.done_reason == "load" and r.message.role == "assistant"
    r = client.chat("tiny-mlx", messages=[], keep_alive=0)
    assert r.done_reason == "unload" and _loaded(client) == {}


def test_keep_alive(private) -> None:
    _, client = private
    client.generate("tiny", "hi", options={"num_predict": 2}, keep_alive="10m")
    expires = _loaded(client)["tiny:latest"].expires_at
    assert expires is not None
    left = (expires - datetime.now(UTC)).total_seconds()
    assert 500 < left <= 600
    r = client.chat("tiny", messages=CAPITAL, options={"num_predict": 2}, keep_alive=0)
    assert r.done
    _wait_unloaded(client, "tiny:latest")
    # Ollama semantics: a request without keep_alive is back to the default (the profile's 1h)
    client.generate("tiny", "hi", options={"num_predict": 2})
    time.sleep(0.5)
    expires = _loaded(client)["tiny:latest"].expires_at
    assert expires is not None and 3000 < (expires - datetime.now(UTC)).total_seconds() <= 3600
    client.generate("tiny", "hi", options={"num_predict": 2}, keep_alive=-1)
    forever = _loaded(client)["tiny:latest"].expires_at
    assert forever is not None and forever.year > 2100


def test_a_broken_model_does_not_break_listing(private) -> None:
    proc, client = private
    ghost = next(m for m in client.list().models if m.model == "ghost:latest")
    assert ghost.size == 0 and ghost.details is not None and ghost.details.format == "gguf"
    r = httpx.post(proc.url + "/llm/api/show", json={"model": "ghost"}, timeout=60)
    assert r.status_code == 503 and "ghost.gguf" in r.json()["error"]
    assert str(proc.home) not in r.json()["error"]  # no local paths in errors
