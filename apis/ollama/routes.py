"""The Ollama dialect's routes (`/api/*`, plus `/` which Ollama clients probe for liveness).

Handlers live next to this file: info.py (tags, show, ps), generate.py (chat, generate), embed.py
(embed, embeddings). Models come from the profile only: the model-management endpoints (pull,
push, create, copy, delete) answer with a clear error instead of pretending.
"""

from __future__ import annotations

from aiohttp import web

from mlx_serve.apis.errors import RequestError

from .embed import embed, embeddings
from .generate import chat, generate
from .info import ps, show, tags

OLLAMA_VERSION = "0.9.0"  # what we speak; some clients refuse servers older than 0.6.4
MANAGED = ("pull", "push", "create", "copy", "delete", "blobs/{digest}")


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})


async def managed(request: web.Request) -> web.Response:
    raise RequestError(
        f"{request.path} is not supported: mlx-serve serves the models declared in its profile "
        "(~/.mlx-serve/config.toml); add or remove models there",
        status=501,
        kind="invalid_request",
    )


def add_routes(app: web.Application, prefix: str) -> None:
    router = app.router
    router.add_get(f"{prefix}/", root)  # also answers HEAD
    router.add_get(f"{prefix}/api/version", version)
    router.add_get(f"{prefix}/api/tags", tags)
    router.add_post(f"{prefix}/api/show", show)
    router.add_get(f"{prefix}/api/ps", ps)
    router.add_post(f"{prefix}/api/chat", chat)
    router.add_post(f"{prefix}/api/generate", generate)
    router.add_post(f"{prefix}/api/embed", embed)
    router.add_post(f"{prefix}/api/embeddings", embeddings)
    for name in MANAGED:
        router.add_route("*", f"{prefix}/api/{name}", managed)
