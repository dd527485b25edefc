"""POST /api/embed (input string or list -> `embeddings`) and the legacy POST /api/embeddings
(prompt -> `embedding`)."""

from __future__ import annotations

import time

from aiohttp import web

from mlx_serve.apis.body import read_body
from mlx_serve.apis.context import registry as get_registry
from mlx_serve.engines.types import GenerationRequest

from . import translate
from .generate import keep_alive_for
from .protocol import EmbeddingsRequest, EmbedRequest


async def _embed(request: web.Request, name: str, keep_alive: object, texts: list[str]):
    """(vectors, prompt tokens, load seconds) through a lease that carries the request's keep_alive."""
    registry = get_registry(request)
    keep = keep_alive_for(registry, registry.resolve(name), keep_alive)
    async with registry.lease(name, keep) as lease:
        if not texts:  # Ollama: an empty input just loads the model
            return [], 0, lease.load_wait
        vectors = await lease.engine.embed(texts)
        tokens = 0
        for text in texts:
            tokens += await lease.engine.count_tokens(GenerationRequest(prompt=text))
        return vectors, tokens, lease.load_wait


async def embed(request: web.Request) -> web.Response:
    req = await read_body(request, EmbedRequest)
    started = time.monotonic()
    vectors, tokens, load = await _embed(request, req.model, req.keep_alive, req.texts)
    total = time.monotonic() - started
    timings = translate.Timings.from_seconds(total, load, total - load, 0)
    body = {
        "model": req.model,
        "embeddings": translate.shorten(vectors, req.dimensions),
        "total_duration": timings.total_ns,
        "load_duration": timings.load_ns,
        "prompt_eval_count": tokens,
    }
    return web.json_response(body)


async def embeddings(request: web.Request) -> web.Response:
    req = await read_body(request, EmbeddingsRequest)
    vectors, _, _ = await _embed(request, req.model, req.keep_alive, [req.prompt] if req.prompt else [])
    return web.json_response({"embedding": vectors[0] if vectors else []})
