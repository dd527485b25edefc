"""Server-sent events for streaming dialects (OpenAI `data:` lines, Anthropic named events).

Each event is written as it comes; what one pass of the event loop writes goes out in one socket
send (corked.py), so a fast stream's batch of tokens is one packet.
A client that went away surfaces as ClientGone; handlers stop iterating their events then, and
closing the event stream cancels the generation (together with aiohttp's handler cancellation).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .corked import CorkedStreamResponse

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must not buffer the stream
}


class ClientGone(Exception):
    """The client closed the connection while we were writing."""


async def open_stream(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    base = dict(HEADERS)
    if request_id := request.get("request_id"):  # the middleware adds it only after the handler returns
        base["X-Request-Id"] = request_id
    response = CorkedStreamResponse(status=200, headers={**base, **(headers or {})})
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
    except (ConnectionError, RuntimeError) as exc:  # RuntimeError: transport already closed
        raise ClientGone() from exc
    return response


def encode(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


async def send(response: web.StreamResponse, data: Any, event: str | None = None) -> None:
    """One event: `data: <json>` (with `event: <name>` when given), then a blank line."""
    try:
        await response.write(encode(data, event))
    except (ConnectionError, RuntimeError) as exc:
        raise ClientGone() from exc


async def send_done(response: web.StreamResponse) -> None:
    """OpenAI's end-of-stream marker, then the end of the HTTP body."""
    await send(response, "[DONE]")
    await finish(response)


async def finish(response: web.StreamResponse) -> None:
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError) as exc:
        raise ClientGone() from exc
