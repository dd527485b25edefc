"""A streaming response that sends what one pass of the event loop writes as one socket send.

Each socket send is a system call, a trip through loopback TCP and a wake-up of the client, on the
same cores the engine computes on (on 2 CPU cores, one send per token cost ~7% of llama.cpp's
SmolLM2 decode speed). Fast streams reach the loop in batches (engines/worker.Handoff: every 20 ms
while tokens keep coming), and the handler writes a batch's events without waiting in between; they
are held until the loop's pass ends and go out together. Nothing waits for a timer here: a lone
write goes out in the same pass, so time to first token is unchanged. A write made while the
previous send still waits for the socket to drain waits too, as a plain write would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


class CorkedStreamResponse(web.StreamResponse):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pending: list[bytes] = []
        self._flush: asyncio.Handle | None = None  # the end-of-pass send, when writes are pending
        self._sending: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None  # from an end-of-pass send: raised at the next write

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._raise_failure()
        if self._sending is not None and not self._sending.done():
            await self._sending  # the socket is backed up: wait for it like a plain write would
            self._raise_failure()
        self._pending.append(bytes(data))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._start_send)

    async def write_eof(self, data: bytes = b"") -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._sending is not None:
            await self._sending
        self._raise_failure()
        await self._send()
        await super().write_eof(data)

    async def _send(self) -> None:
        if self._pending:
            data = b"".join(self._pending)  # taken before the await: sends keep their order
            self._pending.clear()
            await super().write(data)

    def _start_send(self) -> None:
        self._flush = None
        self._sending = asyncio.ensure_future(self._send_quietly())

    async def _send_quietly(self) -> None:
        try:
            await self._send()
        except Exception as exc:  # e.g. the client left: the handler learns it at its next write
            self._failure = exc

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
