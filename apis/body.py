"""Reading request bodies: JSON only, bounded in size and depth, validated by strict wire models.

Every failure is a RequestError naming the field, which each dialect turns into its own 400.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from .context import limits
from .errors import RequestError

log = logging.getLogger("mlx_serve.apis")
M = TypeVar("M", bound=BaseModel)


class WireModel(BaseModel):
    """Base for request wire models: strict types, no NaN/inf, unknown fields ignored (logged)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_tree(value: Any, max_depth: int) -> None:
    """Nesting depth and text: JSON's \\uXXXX escapes can spell a lone UTF-16 surrogate, which
    no UTF-8 text (a tokenizer, a log line, a reply) can hold; refuse it here, naming the field."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, level, path = stack.pop()
        if level > max_depth:
            raise RequestError(f"request JSON is nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            for key, item in node.items():
                child = f"{path}.{key}" if path else key
                if _LONE_SURROGATE.search(key):
                    raise RequestError(f"{path or 'body'}: a key is not valid Unicode (lone surrogate)")
                stack.append((item, level + 1, child))
        elif isinstance(node, list):
            stack.extend(
                (item, level + 1, f"{path}[{i}]")
                for i, item in enumerate(node)
                if isinstance(item, str | dict | list)  # token-id arrays can be long: skip numbers
            )
        elif isinstance(node, str) and _LONE_SURROGATE.search(node):
            raise RequestError(
                f"{path}: not valid Unicode (a lone surrogate such as \\ud800 has no UTF-8 form)", path
            )


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # aiohttp enforces client_max_size (413) before we get here
    if not raw.strip():
        raise RequestError("request body is empty; expected a JSON object")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    _check_tree(data, limits(request).max_json_depth)
    return data


def field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "tagged-union", "json-or-python", "lax-or-strict")):
            out += f".{part}" if out else str(part)
    return out


def validate(model: type[M], data: dict[str, Any]) -> M:
    """Validate a body; the first error becomes a 400 naming its field."""
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = field_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise RequestError(f"{param}: {msg}" if param else msg, param or None) from None
    unknown = set(data) - set(model.model_fields) - {f.alias for f in model.model_fields.values() if f.alias}
    if unknown:
        log.debug("ignoring unknown fields in %s: %s", model.__name__, sorted(unknown))
    return parsed


async def read_body(request: web.Request, model: type[M]) -> M:
    return validate(model, await read_json(request))
