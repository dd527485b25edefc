"""What an outside battery of bad inputs found: each one a clean 4xx in its dialect's format, and
the daemon keeps serving. Also: nothing in the repository reaches past the clone."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from mlx_serve.profiles.units import MAX_DURATION_SECONDS, parse_duration

LONE = '"\\ud800 hello"'  # valid JSON: the escape spells a lone UTF-16 surrogate
MESSAGES = '[{"role": "user", "content": ' + LONE + "}]"

# (route, body with a lone surrogate, the dialect's error shape)
SURROGATE_BODIES = [
    ("/v1/chat/completions", '{"model": "smol", "messages": ' + MESSAGES + "}", "openai"),
    ("/v1/completions", '{"model": "smol", "prompt": ' + LONE + "}", "openai"),
    ("/v1/embeddings", '{"model": "embed", "input": ' + LONE + "}", "openai"),
    ("/v1/responses", '{"model": "smol", "input": ' + LONE + "}", "openai"),
    ("/v1/messages", '{"model": "smol", "max_tokens": 4, "messages": ' + MESSAGES + "}", "anthropic"),
    ("/v1/messages/count_tokens", '{"model": "smol", "messages": ' + MESSAGES + "}", "anthropic"),
    ("/api/chat", '{"model": "smol", "messages": ' + MESSAGES + "}", "ollama"),
    ("/api/generate", '{"model": "smol", "prompt": ' + LONE + "}", "ollama"),
    ("/api/embed", '{"model": "embed", "input": ' + LONE + "}", "ollama"),
    ("/api/embeddings", '{"model": "embed", "prompt": ' + LONE + "}", "ollama"),
    ("/v1/chat/completions", '{"model": "smol", "messages": [{"role": "user", "\\udfff": "x"}]}', "openai"),
]


def error_message(dialect: str, body: dict) -> str:
    """The message of an error body, asserting the dialect's own shape."""
    if dialect == "openai":
        assert set(body) == {"error"} and {"message", "type"} <= set(body["error"]), body
        return body["error"]["message"]
    if dialect == "anthropic":
        assert body["type"] == "error" and {"type", "message"} <= set(body["error"]), body
        return body["error"]["message"]
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def assert_still_serving(daemon) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2}
    assert httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=60).status_code == 200


@pytest.mark.parametrize(("route", "raw", "dialect"), SURROGATE_BODIES, ids=lambda v: str(v)[:30])
def test_lone_surrogate_is_a_400_in_the_dialects_format(daemon, route: str, raw: str, dialect: str) -> None:
    r = httpx.post(
        daemon.url + route, content=raw.encode(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 400, r.text
    assert "not valid Unicode" in error_message(dialect, r.json())
    assert_still_serving(daemon)


def test_durations_are_bounded() -> None:
    assert parse_duration(10**400) is None and parse_duration("1" + "0" * 400) is None  # forever
    assert parse_duration(1e15) is None and parse_duration("99999999999d") is None
    assert parse_duration(MAX_DURATION_SECONDS) == MAX_DURATION_SECONDS
    assert parse_duration("5m") == 300 and parse_duration(0) == 0 and parse_duration(-1) is None


@pytest.mark.parametrize("keep_alive", [b"1" + b"0" * 400, b"1e15", b'"1e400"', b'"99999999999d"'])
def test_huge_keep_alive_means_forever_and_ps_keeps_answering(daemon, keep_alive: bytes) -> None:
    raw = b'{"model": "tiny", "prompt": "hi", "stream": false, "options": {"num_predict": 1}, "keep_alive": '
    r = httpx.post(f"{daemon.url}/api/generate", content=raw + keep_alive + b"}", timeout=60)
    assert r.status_code == 200, r.text
    ps = httpx.get(f"{daemon.url}/api/ps", timeout=30)
    assert ps.status_code == 200, ps.text
    tiny = next(m for m in ps.json()["models"] if m["name"] == "tiny:latest")
    assert datetime.fromisoformat(tiny["expires_at"].replace("Z", "+00:00")).year > 2100


# ---- structured output always terminates ------------------------------------------------------

INTEGER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def _accepts(schema: dict, text: str) -> bool:
    """Whether constrained decoding (over a byte tokenizer) lets `text` through, and may end there."""
    from llguidance import LLMatcher, LLTokenizer

    from mlx_serve.engines.text.constrained import grammar_for

    tokenizer = LLTokenizer("byte")
    matcher = LLMatcher(tokenizer, grammar_for({"type": "json_schema", "schema": schema}))
    ok = matcher.consume_tokens(tokenizer.tokenize_bytes(text.encode()))
    return bool(ok) and not matcher.is_error() and matcher.is_accepting()


@pytest.mark.parametrize(
    ("schema", "text", "accepted"),
    [
        ({"type": "integer"}, "999999999999999999", True),
        ({"type": "integer"}, "-42", True),
        ({"type": "integer"}, "1" * 19, False),  # past 64 bits' 18 safe digits: the model must stop
        ({"type": "integer"}, "1" * 400, False),
        ({"type": "number"}, "12.5", True),
        ({"type": "number"}, "-0.000000001", True),
        ({"type": "number"}, "1." + "1" * 40, False),  # fraction digits are bounded too
        ({"type": "number"}, "1" * 40, False),
        ({"type": ["integer", "null"]}, "1" * 40, False),
        ({"type": "integer", "minimum": 10, "maximum": 20}, "15", True),  # the schema's own bounds win
        ({"type": "integer", "minimum": 10, "maximum": 20}, "21", False),
        ({"type": "object", "properties": {"n": {"type": "integer"}}}, '{"n": ' + "7" * 30 + "}", False),
        ({"type": "array", "items": {"type": "number"}}, "[1.5, 2, -3.25]", True),
    ],
)
def test_unbounded_integers_and_numbers_are_bounded(schema: dict, text: str, accepted: bool) -> None:
    assert _accepts(schema, text) is accepted


def test_integer_field_json_is_valid_when_the_model_has_room(daemon) -> None:
    """SmolLM2 writes `"population": 1111...` without end when integers are unbounded."""
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Give the city and population of Paris as JSON."}],
        "max_tokens": 120,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": INTEGER_SCHEMA}},
    }
    r = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    value = json.loads(choice["message"]["content"])
    assert isinstance(value["population"], int) and -(2**63) <= value["population"] < 2**63


# ---- the repository stands alone --------------------------------------------------------------


# Spelled in pieces, so this file does not match what it looks for (nor the project's own grep).
SIBLING_MARKERS = ("../" + "shared", "shared/" + "reference", "parents" + "[2]", "DESIGN" + " §")


def test_nothing_reaches_past_the_clone() -> None:
    """A user's clone has nothing beside it: no code or test may read a sibling folder."""
    root = Path(__file__).resolve().parents[1]
    tracked = ["daemon", "engines", "apis", "profiles", "launchd", "tests", "Makefile", "pyproject.toml"]
    files = subprocess.run(
        ["git", "ls-files", *tracked], cwd=root, capture_output=True, text=True
    ).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    outside = []
    for name in files:
        if name.startswith("tests/reference/") or not (root / name).is_file():
            continue
        text = (root / name).read_text(errors="replace")
        for needle in SIBLING_MARKERS:
            if needle in text:
                outside.append(f"{name}: {needle}")
    assert not outside, outside
