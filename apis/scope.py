"""What the request's API key may see. The daemon's auth middleware sets MODEL_SCOPE on requests made
with a key limited to some models (`mlx-serve keys create NAME --models GLOB`); the dialects' model
listings show only the names it allows. Without it (no key needed, or a key for every model) all
models are visible. Using a model out of scope is refused by the middleware itself (403)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

# request key: a predicate on a requested model name (an id or an alias), set only for scoped keys
MODEL_SCOPE = "api_key_model_scope"

ModelScope = Callable[[str], bool]


def model_visible(request: web.Request, name: str) -> bool:
    allowed: ModelScope | None = request.get(MODEL_SCOPE)
    return allowed is None or allowed(name)
