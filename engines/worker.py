"""One long-lived thread per engine, bridged to asyncio.

MLX streams are thread-local (ARCHITECTURE.md "Verified facts"): load, generate and unload must all run on the same
thread, so every engine call goes through its EngineThread. llama.cpp contexts are not thread-safe
either, so the llama.cpp engine uses the same bridge. Jobs run one at a time in FIFO order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

T = TypeVar("T")
Emit = Callable[[Any], None]
log = logging.getLogger("mlx_serve.engines.worker")
PACE = 0.02  # seconds: while items keep coming, the event loop takes them this often


class Handoff:
    """Hands items from engine threads to one event loop, in batches while they keep coming.

    Waking a loop from another thread is a pipe write on the producing thread, and the woken loop
    takes a core: on 2 cores busy with llama.cpp's threads, that cost the decode loop ~100 us a
    token (measured), 1.5% of SmolLM2's step. So only the first item after a quiet spell wakes the
    loop; the loop then takes whatever has been posted every PACE, by its own timer (no pipe
    write), until a tick finds nothing. Urgent items (a stream's first token, its end, an error)
    wake the loop at once, so time to first token and a request's end are never held; other
    items wait at most PACE. One Handoff per loop (handoff_for), shared by every stream on it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the registry's key: a strong reference would keep it alive
        self._lock = threading.Lock()
        self._posted: list[tuple[Callable[[Any], None], Any]] = []
        self._scheduled = False  # a wake-up or the timer will take what is posted
        self._timer: asyncio.TimerHandle | None = None

    def post(self, deliver: Callable[[Any], None], item: Any, urgent: bool = False) -> None:
        """Any thread: deliver(item) on the loop, in posting order. RuntimeError: the loop is gone."""
        with self._lock:
            self._posted.append((deliver, item))
            if self._scheduled and not urgent:
                return
            self._scheduled = True
        loop = self._loop()
        if loop is None:
            raise RuntimeError("the event loop is gone")
        loop.call_soon_threadsafe(self._take)

    def _take(self) -> None:
        """On the loop: deliver everything posted; keep ticking while something was."""
        with self._lock:
            posted, self._posted = self._posted, []
            if not posted:  # a quiet tick: the next post wakes the loop
                self._scheduled = False
        if not posted:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(PACE, self._tick)
        for deliver, item in posted:
            deliver(item)

    def _tick(self) -> None:
        self._timer = None
        self._take()


_handoffs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Handoff] = weakref.WeakKeyDictionary()


def handoff_for(loop: asyncio.AbstractEventLoop) -> Handoff:
    """The loop's Handoff; call it on that loop's thread."""
    handoff = _handoffs.get(loop)
    if handoff is None:
        handoff = _handoffs[loop] = Handoff(loop)
    return handoff


class _End:
    pass


class Failure:
    """An error for a stream's consumer to raise, handed over like its events."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _ends_stream(item: Any) -> bool:
    return isinstance(item, (_End, Failure))


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
            from mlx_serve.engines.errors import EngineNotLoadedError

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
        receiver = Receiver.here()
        cancelled = receiver.cancelled

        def emit(item: Any) -> None:
            post_by_loop([(receiver, item)], last=_ends_stream)

        def job() -> None:
            try:
                if not cancelled.is_set():
                    producer(emit, cancelled)
            except BaseException as exc:
                emit(Failure(exc))
            finally:
                emit(_End())

        self.submit(job)
        try:
            while True:
                item = await receiver.queue.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, Failure):
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


@dataclass(eq=False)
class Receiver:
    """The receiving end of one stream: an asyncio queue on its event loop, fed through the
    loop's Handoff by post_by_loop. Create it on that loop (Receiver.here())."""

    handoff: Handoff
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the consumer left
    started: bool = False  # an item was posted

    @classmethod
    def here(cls, **fields: Any) -> Self:
        return cls(handoff_for(asyncio.get_running_loop()), **fields)


def post_by_loop(posts: list[tuple[Receiver, Any]], last: Callable[[Any], bool]) -> None:
    """Put each (receiver, item) in the receiver's queue on its event loop: one post per loop to
    its Handoff, urgent when it holds a receiver's first item or a `last` one. When a loop is gone
    (the process is shutting down), its receivers are cancelled so that their producers stop."""
    batches: dict[Handoff, list[tuple[Receiver, Any]]] = {}
    urgent: set[Handoff] = set()
    for receiver, item in posts:
        batches.setdefault(receiver.handoff, []).append((receiver, item))
        if not receiver.started or last(item):
            urgent.add(receiver.handoff)
        receiver.started = True
    for handoff, batch in batches.items():
        try:
            handoff.post(_put_in_queues, batch, handoff in urgent)
        except RuntimeError:
            for receiver, _ in batch:
                receiver.cancelled.set()


def _put_in_queues(batch: list[tuple[Receiver, Any]]) -> None:
    for receiver, item in batch:
        receiver.queue.put_nowait(item)
