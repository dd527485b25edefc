"""Process-level overrides from the environment, e.g. MLX_SERVE_SERVER__PORT=8080.

pydantic-settings collects the variables; each value is read as a TOML literal so `8080` is an
int, `true` a bool and `["a","b"]` a list, while a bare word like `0.0.0.0` stays a string. The
result is merged over the file and then validated by the same strict profile model.
"""

from __future__ import annotations

import tomllib
from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict


class _EnvSections(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLX_SERVE_", env_nested_delimiter="__", extra="ignore")

    server: dict[str, Any] = {}
    apis: dict[str, Any] = {}
    auth: dict[str, Any] = {}
    metrics: dict[str, Any] = {}


def _literal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def env_overrides() -> dict[str, Any]:
    sections = _EnvSections().model_dump()
    return {name: _literal(values) for name, values in sections.items() if values}
