"""OpenAI dialect routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

(/v1/responses lives in responses.py.) Handlers parse a wire model, translate it to the internal
request, run it through apis.generation, and encode the events. Events are iterated inside the
handler, so aiohttp's handler cancellation (a client that leaves) closes the event stream, which
stops the generation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from mlx_serve.engines.errors import ContextOverflowError
from mlx_serve.engines.kind import engine_kind
from mlx_serve.engines.types import Event, Finished

from .. import sse
from ..body import read_body
from ..context import limits, registry
from ..errors import ErrorInfo, RequestError, classify, error_body, error_response
from ..generation import collect, embed_texts, open_generation
from ..scope import model_visible
from . import translate
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    check_chat,
    check_completion,
)

log = logging.getLogger("mlx_serve.apis.openai")
DIALECT = "openai"
CREATED = int(time.time())  # models have no creation date here; a stable per-process value


# ---- models ----------------------------------------------------------------------------------


def _is_glob(alias: str) -> bool:
    return any(c in alias for c in "*?[")


def _model_object(slot: Any) -> dict[str, Any]:
    """A profile model as an OpenAI model object plus what we know without loading it."""
    spec, info = slot.spec, None
    if str(slot.state) == "loaded" and slot.engine is not None:
        try:
            info = slot.engine.info()
        except Exception:  # unloaded in between: fall back to the profile
            info = None
    entry: dict[str, Any] = {
        "id": slot.model_id,
        "object": "model",
        "created": CREATED,
        "owned_by": "mlx-serve",
        "engine": engine_kind(spec),
        "loaded": info is not None,
        "aliases": list(spec.aliases),
    }
    context_length = info.context_length if info else spec.context_length
    if context_length:
        entry["context_length"] = context_length
    if info is not None:
        entry["capabilities"] = sorted(info.capabilities)
    elif spec.embedding:
        entry["capabilities"] = ["embedding"]
    return entry


async def list_models(request: web.Request) -> web.Response:
    """Every profile model and every exact alias, loaded or not; never loads anything.
    Glob aliases are patterns, not names: they appear in their model's `aliases` only.
    A key limited to some models sees only the names it may use."""
    data = []
    for slot in registry(request).slots():
        entry = _model_object(slot)
        names = [entry] + [
            {**entry, "id": a, "alias_of": slot.model_id} for a in entry["aliases"] if not _is_glob(a)
        ]
        data += [e for e in names if model_visible(request, e["id"])]
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    reg = registry(request)
    model_id = reg.resolve(name)  # UnknownModelError -> 404 model_not_found
    slot = next(s for s in reg.slots() if s.model_id == model_id)
    entry = _model_object(slot)
    if name != model_id:  # an alias (exact or glob match) answers under the name asked for
        entry |= {"id": name, "alias_of": model_id}
    return web.json_response(entry)


# ---- generation ------------------------------------------------------------------------------


def _check_generates(request: web.Request, name: str) -> None:
    """An embedding model cannot chat or complete: say so before loading it."""
    reg = registry(request)
    spec = reg.profile.models.get(reg.resolve(name))
    if spec is not None and spec.embedding:
        raise RequestError(f"model {name!r} is an embedding model; use /v1/embeddings", "model")


async def _stream(request: web.Request, events: AsyncIterator[Event], chunker: Any) -> web.StreamResponse:
    """SSE `data: {...}` chunks ending with `data: [DONE]`; errors after the headers go in-band."""
    response = await sse.open_stream(request)
    try:
        for chunk in chunker.start():
            await sse.send(response, chunk)
        async for event in events:
            if isinstance(event, Finished) and event.reason == "error":
                message = f"generation failed: {event.error or 'engine error'}"
                await sse.send(response, error_body(DIALECT, ErrorInfo(500, "internal", message)))
                return response
            for chunk in chunker.feed(event):
                await sse.send(response, chunk)
        await sse.send_done(response)
    except sse.ClientGone:
        log.debug("client left %s mid-stream", request.path)
    except Exception as exc:  # the status line is gone: report in the stream, then end it
        info = classify(exc)
        if info.kind == "internal":
            log.exception("stream on %s failed", request.path)
        try:
            await sse.send(response, error_body(DIALECT, info))
        except sse.ClientGone:
            pass
    return response


def _failed(finished: Finished) -> web.Response | None:
    if finished.reason != "error":
        return None
    return error_response(
        DIALECT, ErrorInfo(500, "internal", f"generation failed: {finished.error or 'engine error'}")
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, ChatCompletionRequest)
    check_chat(body, limits(request))
    _check_generates(request, body.model)
    model_id, events = await open_generation(request, DIALECT, body.model, translate.chat_request(body))
    async with aclosing(events):
        if body.stream:
            chunker = translate.ChatChunker(model_id, body.include_usage, bool(body.logprobs))
            return await _stream(request, events, chunker)
        result = await collect(events)
    if (failure := _failed(result.finished)) is not None:
        return failure
    completion = translate.chat_completion_body(
        translate.new_id("chatcmpl"),
        int(time.time()),
        model_id,
        result.text,
        result.reasoning,
        result.tool_calls,
        result.logprobs if body.logprobs else None,
        result.finished,
    )
    return web.json_response(completion)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, CompletionRequest)
    check_completion(body, limits(request))
    _check_generates(request, body.model)
    try:
        model_id, events = await open_generation(
            request, DIALECT, body.model, translate.completion_request(body)
        )
    except ContextOverflowError as exc:  # name the field this dialect calls it by
        raise RequestError(str(exc), "prompt", kind="context_length_exceeded") from None
    wants_logprobs = body.logprobs is not None
    async with aclosing(events):
        if body.stream:
            chunker = translate.CompletionChunker(model_id, body.include_usage, wants_logprobs)
            return await _stream(request, events, chunker)
        result = await collect(events)
    if (failure := _failed(result.finished)) is not None:
        return failure
    completion = translate.completion_body(
        translate.new_id("cmpl"),
        int(time.time()),
        model_id,
        result.text,
        result.logprobs if wants_logprobs else None,
        result.finished,
    )
    return web.json_response(completion)


async def embeddings(request: web.Request) -> web.Response:
    body = await read_body(request, EmbeddingRequest)
    reg = registry(request)
    spec = reg.profile.models.get(reg.resolve(body.model))
    if spec is None or not spec.embedding:
        raise RequestError(
            f"model {body.model!r} is not an embedding model (set embedding = true in its profile)", "model"
        )
    try:
        model_id, vectors, tokens = await embed_texts(request, body.model, body.input)
    except ContextOverflowError as exc:
        raise RequestError(str(exc), "input", kind="context_length_exceeded") from None
    return web.json_response(translate.embedding_body(model_id, vectors, body.encoding_format, tokens))


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(f"{prefix}/v1/models", list_models)
    app.router.add_get(f"{prefix}/v1/models/{{model:.+}}", retrieve_model)
    app.router.add_post(f"{prefix}/v1/chat/completions", chat_completions)
    app.router.add_post(f"{prefix}/v1/completions", completions)
    app.router.add_post(f"{prefix}/v1/embeddings", embeddings)

    from .responses import add_routes as add_responses

    add_responses(app, prefix)
