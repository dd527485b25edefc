"""CorkedStreamResponse over real loopback HTTP: every byte arrives in order, the writes of one
pass of the event loop go out as one send, and a lone write is not held."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer

from mlx_serve.apis.corked import CorkedStreamResponse

Handler = Callable[[web.StreamResponse], Awaitable[None]]


async def _receive(handler: Handler) -> list[tuple[float, bytes]]:
    """Serve one streaming response written by `handler`; return (arrival time, bytes) per read."""

    async def route(request: web.Request) -> web.StreamResponse:
        response = CorkedStreamResponse(headers={"Content-Type": "text/plain"})
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


async def test_the_writes_of_one_pass_go_out_as_one_send() -> None:
    bursts = [[f"data: token {i}.{j}\n\n".encode() for j in range(5)] for i in range(4)]

    async def batched(response: web.StreamResponse) -> None:
        for burst in bursts:  # as the handler writes a batch of events from the engine
            for event in burst:
                await response.write(event)
            await asyncio.sleep(0.05)

    reads = await _receive(batched)
    assert _body(reads) == b"".join(b"".join(burst) for burst in bursts)
    # Headers, four bursts, the end: one send each (a send per write would be 20 reads or more).
    assert len(reads) <= 7, len(reads)
    for burst in bursts:  # each burst arrives whole, in one read
        assert any(b"".join(burst) in chunk for _, chunk in reads), burst


async def test_a_lone_write_is_not_held() -> None:
    async def slow(response: web.StreamResponse) -> None:
        await response.write(b"first ")
        await asyncio.sleep(0.5)
        await response.write(b"second")

    reads = await _receive(slow)
    assert _body(reads) == b"first second"
    assert _arrival(reads, b"second") - _arrival(reads, b"first") > 0.4  # "first" did not wait for "second"


async def test_what_is_pending_goes_out_before_the_end() -> None:
    async def ends_at_once(response: web.StreamResponse) -> None:
        for i in range(3):
            await response.write(f"{i} ".encode())
        # write_eof (by _receive) follows in the same pass: it sends the pending writes first

    reads = await _receive(ends_at_once)
    assert _body(reads) == b"0 1 2 "
