"""POST /api/chat and POST /api/generate: NDJSON streaming (Ollama's default) or one JSON object.

A request with no messages (chat) or no prompt (generate) is Ollama's load call, or its unload
call with keep_alive 0; both answer with one `done: true` object (done_reason "load"/"unload").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from mlx_serve.apis.body import read_body
from mlx_serve.apis.context import limits
from mlx_serve.apis.context import registry as get_registry
from mlx_serve.apis.corked import CorkedStreamResponse
from mlx_serve.apis.errors import RequestError, classify
from mlx_serve.apis.generation import collect, open_generation
from mlx_serve.apis.redact import redact_home
from mlx_serve.engines.types import Event, Finished, GenerationRequest
from mlx_serve.profiles.units import parse_duration

from . import translate
from .info import find_slot
from .protocol import ChatRequest, GenerateRequest

log = logging.getLogger("mlx_serve.apis.ollama")
NDJSON = "application/x-ndjson"


def keep_alive_for(registry: Any, model_id: str, value: Any) -> float | None:
    return translate.keep_alive_seconds(value, registry.profile.models[model_id].ttl_seconds)


async def chat(request: web.Request) -> web.StreamResponse:
    req = await read_body(request, ChatRequest)
    lim = limits(request)
    if len(req.messages) > lim.max_messages:
        raise RequestError(f"at most {lim.max_messages} messages are allowed", "messages")
    if req.tools and len(req.tools) > lim.max_tools:
        raise RequestError(f"at most {lim.max_tools} tools are allowed", "tools")
    if not req.messages:
        return await lifecycle(request, "chat", req.model, req.keep_alive)
    return await respond(request, "chat", req, translate.chat_request(req))


async def generate(request: web.Request) -> web.StreamResponse:
    req = await read_body(request, GenerateRequest)
    if req.template:
        log.debug("ignoring the request's Go template: prompts use the model's own chat template")
    if not req.prompt and not req.suffix:
        return await lifecycle(request, "generate", req.model, req.keep_alive)
    return await respond(request, "generate", req, translate.generate_request(req))


async def lifecycle(request: web.Request, dialect: str, name: str, keep_alive: Any) -> web.Response:
    registry = get_registry(request)
    model_id = registry.resolve(name)
    if keep_alive is not None and parse_duration(keep_alive) == 0:
        await registry.unload(name, "keep_alive 0")
        reason = "unload"
    else:
        async with registry.lease(name, keep_alive_for(registry, model_id, keep_alive)):
            reason = "load"
    return web.json_response(translate.lifecycle_response(dialect, name, reason))


async def respond(
    request: web.Request, dialect: str, req: ChatRequest | GenerateRequest, gen: GenerationRequest
) -> web.StreamResponse:
    started = time.monotonic()
    registry = get_registry(request)
    model_id = registry.resolve(req.model)
    slot = find_slot(registry, model_id)
    was_loaded = slot.state == "loaded"
    keep = keep_alive_for(registry, model_id, req.keep_alive)
    _, events = await open_generation(request, "ollama", req.model, gen, keep)
    first = time.monotonic()  # open_generation returns with the first event: prompt evaluated
    load = 0.0 if was_loaded else min(slot.load_seconds, first - started)

    def timings(end: float) -> translate.Timings:
        return translate.Timings.from_seconds(end - started, load, first - started - load, end - first)

    if req.stream:
        return await stream(request, dialect, req.model, events, timings)
    result = await collect(events)
    if result.finished.reason == "error":
        raise RequestError(f"generation failed: {result.finished.error}", status=500, kind="internal")
    body = translate.full_response(
        dialect,
        req.model,
        result.text,
        result.reasoning,
        result.tool_calls,
        result.logprobs,
        result.finished,
        timings(time.monotonic()),
    )
    return web.json_response(body)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def stream(
    request: web.Request,
    dialect: str,
    model: str,
    events: AsyncIterator[Event],
    timings: Callable[[float], translate.Timings],
) -> web.StreamResponse:
    response = CorkedStreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    try:
        async for event in events:
            if isinstance(event, Finished) and event.reason == "error":
                obj: dict[str, Any] | None = {"error": redact_home(f"generation failed: {event.error}")}
            elif isinstance(event, Finished):
                obj = translate.final_chunk(dialect, model, event, timings(time.monotonic()))
            else:
                obj = translate.event_chunk(dialect, model, event)
            if obj is not None:
                await response.write(_line(obj))
    except ConnectionResetError:
        log.debug("client left during a stream")
        return response
    except Exception as exc:  # the status line is sent: the error travels in the stream, as Ollama does
        info = classify(exc)
        if info.kind == "internal":
            log.exception("stream failed")
        await response.write(_line({"error": info.message}))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    await response.write_eof()
    return response
