"""Structured output end to end: OpenAI response_format and Ollama format constrain real engines
(the tiny random models write gibberish unconstrained, so parsing output proves the constraint)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import pytest
from openai import OpenAI

# Bounded so a random model must finish: strings have a max length, no extra keys.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(daemon) -> OpenAI:
    return OpenAI(base_url=daemon.url + "/v1", api_key="x")


@pytest.mark.parametrize("model", ["tiny", "tiny-mlx"])
def test_openai_json_schema_output_validates(client: OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
        max_tokens=200,
        temperature=0,
    )
    content = response.choices[0].message.content
    jsonschema.validate(json.loads(content), SCHEMA)
    assert response.choices[0].finish_reason == "stop"


def test_openai_json_schema_streaming_real_model(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Make up a person with a short name and an age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_ollama_format_schema(daemon) -> None:
    result = ollama.Client(host=daemon.url).chat(
        model="tiny",
        messages=[{"role": "user", "content": "Describe a person."}],
        format=SCHEMA,
        options={"temperature": 0, "num_predict": 200},
    )
    jsonschema.validate(json.loads(result.message.content), SCHEMA)


def test_invalid_schema_is_a_400(daemon) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "wat"}}},
    }
    resp = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
