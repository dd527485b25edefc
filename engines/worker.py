"""One long-lived thread per engine, bridged to asyncio.

MLX streams are thread-local (DESIGN §4): load, generate and unload must all run on the same
thread, so every engine call goes through its EngineThread. llama.cpp contexts are not thread-safe
either, so the llama.cpp engine uses the same bridge. Jobs run one at a time in FIFO order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
Emit = Callable[[Any], None]
log = logging.getLogger("mlx_serve.engines.worker")


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class EngineThread:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException:  # a job reports its own errors; never let the thread die
                log.exception("engine job failed")

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a plain job (it reports its own errors)."""
        if self._closed:  # a job queued behind close() would never run: fail instead of hanging
            from .errors import EngineNotLoadedError

            raise EngineNotLoadedError("engine is unloaded")
        self._jobs.put(job)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the engine thread and await its result."""
        future: Future[T] = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self.submit(job)
        return await asyncio.wrap_future(future)

    async def stream(self, producer: Callable[[Emit, threading.Event], None]) -> AsyncIterator[Any]:
        """Run producer(emit, cancelled) on the engine thread; yield what it emits.

        Closing the iterator (or cancelling its consumer) sets `cancelled`; the producer checks
        it between tokens and returns, which frees the thread for the next job.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is gone (process shutting down): stop producing
                cancelled.set()

        def job() -> None:
            try:
                if not cancelled.is_set():
                    producer(emit, cancelled)
            except BaseException as exc:
                emit(_Failure(exc))
            finally:
                emit(_End())

        self.submit(job)
        try:
            while True:
                item = await items.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            cancelled.set()

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


def post_by_loop(posts: list[tuple[Any, Any]], deliver: Callable[[list[tuple[Any, Any]]], None]) -> None:
    """Hand (receiver, item) pairs to their receivers' event loops with `deliver`: one wake-up per
    loop, not one per item (each wake-up costs the engine thread a GIL hand-over). A receiver has
    `.loop` and `.cancelled` (a threading.Event); when its loop is gone (the process is shutting
    down), it is cancelled so that its producer stops."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
    for receiver, item in posts:
        by_loop.setdefault(receiver.loop, []).append((receiver, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, batch)
        except RuntimeError:
            for receiver, _ in batch:
                receiver.cancelled.set()
