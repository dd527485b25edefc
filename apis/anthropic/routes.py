"""Anthropic dialect routes: POST /v1/messages (plain and streaming) and /v1/messages/count_tokens.

Auth headers (x-api-key, Authorization) and anthropic-version / anthropic-beta are accepted and
ignored here; keys are checked by the daemon's middleware. Errors raised here become Anthropic
error bodies in the daemon's error middleware; once a stream has started, they become an `error`
event instead.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web

from mlx_serve.apis.body import read_body
from mlx_serve.apis.context import limits, registry
from mlx_serve.apis.corked import CorkedStreamResponse
from mlx_serve.apis.errors import classify, error_body
from mlx_serve.apis.generation import open_generation
from mlx_serve.engines.types import Event, Finished

from .protocol import CountTokensBody, MessagesBody, check_limits
from .translate import MessageAssembler, StreamEncoder, encode_sse, new_message_id, to_generation

log = logging.getLogger("mlx_serve.apis.anthropic")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GenerationFailed(Exception):
    """The engine ended a non-streaming generation with an error (reported as a 500 api_error)."""


async def messages(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, MessagesBody)
    check_limits(body, limits(request))
    gen = to_generation(body)
    model_id, events = await open_generation(request, "anthropic", body.model, gen)
    if body.stream:
        return await _stream(request, model_id, events)
    assembler = MessageAssembler(model_id, new_message_id())
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            assembler.feed(event)
    finished = assembler.finished
    if finished is None or finished.reason in ("error", "cancelled"):
        reason = finished.error if finished and finished.error else "generation did not finish"
        raise GenerationFailed(f"model {model_id!r}: {reason}")
    return web.json_response(assembler.body())


async def _stream(request: web.Request, model_id: str, events: AsyncIterator[Event]) -> web.StreamResponse:
    response = CorkedStreamResponse(headers=SSE_HEADERS)
    encoder = StreamEncoder(model_id, new_message_id())
    async with aclosing(events):  # type: ignore[type-var]
        await response.prepare(request)
        await response.write(encode_sse(encoder.start()))
        finished = False
        try:
            async for event in events:
                finished = finished or isinstance(event, Finished)
                await response.write(encode_sse(encoder.feed(event)))
        except ConnectionError:  # the client left; leaving `aclosing` cancels the generation
            log.debug("client left the %s stream", model_id)
            return response
        except Exception as exc:
            info = classify(exc)
            log.exception("anthropic stream for %s failed", model_id)
            data = error_body("anthropic", info)
            await response.write(encode_sse([("error", data)]))
            finished = True
        if not finished:
            error = error_body("anthropic", classify(RuntimeError()))
            await response.write(encode_sse([("error", error)]))
    await response.write_eof()
    return response


async def count_tokens(request: web.Request) -> web.Response:
    """Exact: the engine templates and tokenizes the request /v1/messages would build."""
    body = await read_body(request, CountTokensBody)
    check_limits(body, limits(request))
    gen = to_generation(body)
    async with registry(request).lease(body.model) as lease:
        count = await lease.engine.count_tokens(gen)
    return web.json_response({"input_tokens": count})


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_post(f"{prefix}/v1/messages", messages)
    app.router.add_post(f"{prefix}/v1/messages/count_tokens", count_tokens)
