"""engines.worker.Handoff on a real event loop, fed by a real thread: items arrive in order; while
they keep coming the producer wakes the loop only once and the loop takes them by its timer; urgent
items and the first item after a quiet spell are taken at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mlx_serve.engines import worker


class _Recorder:
    """Counts the thread's wake-ups of the loop and records what the loop receives, and when."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.wakes = 0
        self.items: list[object] = []
        self.arrived: dict[object, float] = {}
        wake = loop.call_soon_threadsafe

        def counted(*args: object) -> asyncio.Handle:
            self.wakes += 1
            return wake(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

    def deliver(self, item: object) -> None:
        self.items.append(item)
        self.arrived[item] = time.monotonic()


async def _in_thread(produce) -> None:  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=produce)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)


async def test_a_fast_producer_wakes_the_loop_once_and_loses_nothing() -> None:
    loop = asyncio.get_running_loop()
    recorder, handoff = _Recorder(loop), worker.Handoff(loop)

    def produce() -> None:
        for i in range(60):  # a token every 2 ms, ~120 ms in all: about 6 ticks of PACE
            handoff.post(recorder.deliver, i, urgent=i in (0, 59))
            time.sleep(0.002)

    wakes_before = recorder.wakes  # run_in_executor wakes the loop too: count only the handoff's
    await _in_thread(produce)
    await asyncio.sleep(worker.PACE * 3)
    assert recorder.items == list(range(60))
    # The first item and the urgent last one wake the loop; the rest ride the loop's timer. A
    # producer thread descheduled for longer than PACE lets a tick go quiet and costs one wake more.
    assert recorder.wakes - wakes_before - 1 < 15, recorder.wakes  # one wake per item would be 60


async def test_held_items_wait_for_the_tick_and_an_urgent_one_takes_them_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "PACE", 5.0)  # a tick that never comes within the test
    loop = asyncio.get_running_loop()
    recorder, handoff = _Recorder(loop), worker.Handoff(loop)
    handoff.post(recorder.deliver, "first")  # nothing scheduled: wakes the loop
    await asyncio.sleep(0.1)
    assert recorder.items == ["first"]
    await _in_thread(lambda: [handoff.post(recorder.deliver, x) for x in ("held-1", "held-2")])
    await asyncio.sleep(0.2)
    assert recorder.items == ["first"]  # waiting for the tick, 5 s away
    await _in_thread(lambda: handoff.post(recorder.deliver, "end", urgent=True))
    await asyncio.sleep(0.2)
    assert recorder.items == ["first", "held-1", "held-2", "end"]


async def test_after_a_quiet_tick_the_next_item_wakes_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "PACE", 0.2)
    loop = asyncio.get_running_loop()
    recorder, handoff = _Recorder(loop), worker.Handoff(loop)
    handoff.post(recorder.deliver, "a")
    await asyncio.sleep(0.5)  # the tick at 0.2 s finds nothing: the handoff goes quiet
    posted = time.monotonic()
    await _in_thread(lambda: handoff.post(recorder.deliver, "b"))
    await asyncio.sleep(0.3)
    assert recorder.items == ["a", "b"]
    assert recorder.arrived["b"] - posted < 0.15  # taken at once, not at a tick PACE later


async def test_one_handoff_per_loop() -> None:
    loop = asyncio.get_running_loop()
    assert worker.handoff_for(loop) is worker.handoff_for(loop)


async def test_post_by_loop_takes_a_receivers_first_and_last_items_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "PACE", 5.0)
    # A Handoff of its own, not the loop's (handoff_for): its 5 s timer must not outlive the test.
    handoff = worker.Handoff(asyncio.get_running_loop())

    def post(receiver: worker.Receiver, item: str) -> None:
        worker.post_by_loop([(receiver, item)], last=lambda item: item == "end")

    def received(receiver: worker.Receiver) -> list[str]:
        items = []
        while not receiver.queue.empty():
            items.append(receiver.queue.get_nowait())
        return items

    one, two = worker.Receiver(handoff), worker.Receiver(handoff)
    await _in_thread(lambda: post(one, "first"))  # the first item of a receiver: at once
    await asyncio.sleep(0.1)
    assert received(one) == ["first"]
    await _in_thread(lambda: post(one, "middle"))  # held for the tick (5 s away)...
    await _in_thread(lambda: post(two, "first"))  # ...until another receiver's first item
    await asyncio.sleep(0.1)
    assert (received(one), received(two)) == (["middle"], ["first"])
    await _in_thread(lambda: [post(two, "middle"), post(two, "end")])  # the last item: at once
    await asyncio.sleep(0.1)
    assert received(two) == ["middle", "end"]
