"""Validate response bodies and stream chunks against the official OpenAI OpenAPI description.

The spec (`tests/reference/openai-openapi.json`, vendored with its MIT license; or $MLX_SERVE_OPENAI_SPEC) is OpenAPI 3.1 but
still marks some fields with the 3.0 keyword `nullable: true`, which JSON Schema ignores. We honour
it (a schema with `nullable: true` also accepts null): that is how the spec lets stream chunks carry
`finish_reason: null` before the last one (see tests/reference/README.md). The legacy completions stream
reuses `CreateCompletionResponse`, whose `finish_reason` is not marked nullable although the API
sends null on every chunk but the last; `stream=True` allows null there too. Everything else is
validated as written.

Loaded by path from the tests (tests/ is not a package): see test_api_openai.py.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import struct
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator


def spec_path() -> Path:
    env = os.environ.get("MLX_SERVE_OPENAI_SPEC")
    return Path(env) if env else Path(__file__).resolve().parent / "reference" / "openai-openapi.json"


def _honour_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_honour_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _honour_nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        description = node.pop("description", None)
        node = {"anyOf": [node, {"type": "null"}]}
        if description is not None:
            node["description"] = description
    return node


@functools.cache
def _components() -> dict[str, Any]:
    path = spec_path()
    if not path.exists():
        raise FileNotFoundError(f"the OpenAI spec is missing at {path}; set MLX_SERVE_OPENAI_SPEC")
    components = _honour_nullable(json.loads(path.read_text())["components"])
    # Streamed legacy completions: finish_reason is null until the last chunk.
    chunk = copy.deepcopy(components["schemas"]["CreateCompletionResponse"])
    reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
        "anyOf": [reason, {"type": "null"}]
    }
    components["schemas"]["_CompletionStreamChunk"] = chunk
    return components


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    components = _components()
    if name not in components["schemas"]:
        raise KeyError(f"no schema {name!r} in the OpenAI spec")
    root = {"$ref": f"#/components/schemas/{name}", "components": components}
    Draft202012Validator.check_schema(root)
    return Draft202012Validator(root)


def validate(name: str, body: Any, *, stream: bool = False) -> None:
    """Raise AssertionError listing every violation of the named schema."""
    if stream and name == "CreateCompletionResponse":
        name = "_CompletionStreamChunk"
    errors = sorted(_validator(name).iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]]
        raise AssertionError(
            f"body does not match {name}:\n" + "\n".join(lines) + f"\nbody: {str(body)[:2000]}"
        )


def decode_base64_embedding(data: str) -> list[float]:
    raw = base64.b64decode(data)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def validate_embeddings(body: dict[str, Any]) -> None:
    """CreateEmbeddingResponse; base64 vectors (which the spec types only as float arrays) are
    decoded first, so the rest of the body is still checked."""
    checked = copy.deepcopy(body)
    for item in checked.get("data", []):
        if isinstance(item, dict) and isinstance(item.get("embedding"), str):
            item["embedding"] = decode_base64_embedding(item["embedding"])
    validate("CreateEmbeddingResponse", checked)
