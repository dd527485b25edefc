"""PacedStreamResponse over real loopback HTTP: every byte arrives in order, a fast stream's writes
are gathered into few socket sends, the start of a stream and a write after a pause are not held,
and a held write goes out on its timer when nothing follows it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer

from mlx_serve.apis.paced import INTERVAL, PacedStreamResponse

Handler = Callable[[web.StreamResponse], Awaitable[None]]


async def _receive(handler: Handler) -> list[tuple[float, bytes]]:
    """Serve one streaming response written by `handler`; return (arrival time, bytes) per read."""

    async def route(request: web.Request) -> web.StreamResponse:
        response = PacedStreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await handler(response)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", route)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reads = []
        while chunk := await reader.read(65536):
            reads.append((time.monotonic(), chunk))
        writer.close()
        return reads
    finally:
        await server.close()


def _body(reads: list[tuple[float, bytes]]) -> bytes:
    raw = b"".join(chunk for _, chunk in reads)
    chunked = raw.split(b"\r\n\r\n", 1)[1]
    body, rest = b"", chunked
    while True:  # chunked transfer encoding: <hex size>\r\n<data>\r\n ... 0\r\n\r\n
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return body
        body, rest = body + rest[:size], rest[size + 2 :]


def _arrival(reads: list[tuple[float, bytes]], marker: bytes) -> float:
    seen = b""
    for at, chunk in reads:
        seen += chunk
        if marker in seen:
            return at
    raise AssertionError(f"{marker!r} never arrived")


async def test_a_fast_stream_arrives_whole_in_few_sends() -> None:
    events = [f"data: token {i}\n\n".encode() for i in range(60)]

    async def fast(response: web.StreamResponse) -> None:
        for event in events:
            await response.write(event)
            await asyncio.sleep(0.002)  # a token every 2 ms: ~120 ms in all

    reads = await _receive(fast)
    assert _body(reads) == b"".join(events)
    # One socket send per token would be ~60 reads; paced, about one per INTERVAL (plus the
    # unheld first INTERVAL of the stream and the headers).
    assert len(reads) < 30, len(reads)


async def test_the_start_is_not_held_and_a_held_write_goes_out_on_its_timer() -> None:
    async def paused(response: web.StreamResponse) -> None:
        await response.write(b"role ")
        await response.write(b"first ")  # the start of a stream: out at once
        await asyncio.sleep(INTERVAL * 1.5)
        await response.write(b"after-pause ")  # a write after a pause: out at once
        await response.write(b"held ")  # within INTERVAL of the last send: held...
        await asyncio.sleep(0.5)  # ...and nothing follows it for a long while
        await response.write(b"late")

    reads = await _receive(paused)
    assert _body(reads) == b"role first after-pause held late"
    start = _arrival(reads, b"role")
    assert _arrival(reads, b"first") - start < INTERVAL  # not held for the pacing interval
    held = _arrival(reads, b"held") - _arrival(reads, b"after-pause")
    assert held < 0.25, held  # sent by its timer (~INTERVAL), not with the write 0.5 s later
    assert _arrival(reads, b"late") - _arrival(reads, b"held") > 0.25
