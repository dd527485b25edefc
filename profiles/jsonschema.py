"""The profile's JSON schema, checked in as profile.schema.json for editor completion
(e.g. Even Better TOML / Taplo: `#:schema ./profile.schema.json`). A test fails when it drifts."""

from __future__ import annotations

import json
from pathlib import Path

from .schema import Profile

SCHEMA_PATH = Path(__file__).with_name("profile.schema.json")


def profile_json_schema() -> dict:
    schema = Profile.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mlx-serve profile (~/.mlx-serve/config.toml)"
    return schema


def render_schema() -> str:
    return json.dumps(profile_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # regenerate: python -m mlx_serve.profiles.jsonschema
    SCHEMA_PATH.write_text(render_schema())
    print(f"wrote {SCHEMA_PATH}")
