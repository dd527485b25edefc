"""Admission to a model's engine: up to `capacity` requests at once, waiters admitted by priority,
first come first served within one priority. Editors' fill-in-the-middle and short interactive
requests get priority 0, everything else 1, so autocomplete is not stuck behind a long generation."""

from __future__ import annotations

import asyncio
import heapq
import itertools

INTERACTIVE, NORMAL = 0, 1


class PriorityGate:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._holders = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def acquire(self, priority: int = NORMAL) -> None:
        if self._holders < self.capacity and not self._waiters:
            self._holders += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # admitted in the same instant we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the place passes straight to the waiter
                return
        self._holders -= 1
