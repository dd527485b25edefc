"""Registry logic with a fake engine (the scheduler's logic only; the real daemon tests in
test_runtime.py prove the same behaviour with real engines)."""

from __future__ import annotations

import asyncio

import pytest

from mlx_serve.daemon.errors import (
    InsufficientMemoryError,
    ModelUnavailableError,
    QueueFullError,
    UnknownModelError,
)
from mlx_serve.daemon.eviction import Resident, plan_eviction
from mlx_serve.daemon.registry import Registry
from mlx_serve.daemon.slot import SlotState
from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.profiles.loader import parse_profile

GIB = 2**30


class FakeEngine:
    loads: list[str] = []

    def __init__(self, model_id, spec, models) -> None:
        self.model_id = model_id
        self.spec = spec
        self.loaded = False

    async def load(self) -> None:
        FakeEngine.loads.append(self.model_id)
        await asyncio.sleep(0.05)
        if "broken" in self.spec.source:
            raise ModelLoadError(self.model_id, "weights are corrupt")
        self.loaded = True

    async def unload(self) -> None:
        self.loaded = False

    def memory_bytes(self) -> int:
        return size_of(self.spec) if self.loaded else 0

    def memory_breakdown(self) -> dict[str, int]:
        return {"weights": self.memory_bytes(), "kv_cache": 0}


def size_of(spec) -> int:
    return int(spec.source.rsplit("-", 1)[-1]) * GIB


def registry(text: str) -> Registry:
    FakeEngine.loads = []
    profile = parse_profile(text, "t.toml", apply_env=False).profile
    return Registry(
        profile,
        engine_factory=FakeEngine,
        estimator=lambda mid, spec: size_of(spec),
        fetcher=lambda mid, spec: None,
    )


def model(mid: str, gib: int, **extra: str) -> str:
    lines = [f"[models.{mid}]", f'source = "hub/{mid}-{gib}"', 'engine = "mlx"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


EVICTION_TABLE = [
    # (residents (id, GiB, last_used, pinned, busy), needed GiB, budget GiB) -> evict, fits
    ([], 4, 8, (), True),
    ([("a", 4, 1, False, False)], 4, 8, (), True),
    ([("a", 4, 1, False, False), ("b", 2, 2, False, False)], 4, 8, ("a",), True),
    ([("a", 2, 5, False, False), ("b", 2, 1, False, False), ("c", 2, 3, False, False)], 4, 8, ("b",), True),
    (
        [("a", 2, 5, False, False), ("b", 2, 1, False, False), ("c", 2, 3, False, False)],
        5,
        8,
        ("b", "c"),
        True,
    ),
    ([("a", 4, 1, True, False), ("b", 2, 2, False, False)], 4, 8, ("b",), True),
    ([("a", 4, 1, True, False), ("b", 4, 2, False, True)], 4, 8, (), False),
    ([("a", 1, 1, False, False)], 9, 8, (), False),
]


@pytest.mark.parametrize("residents,needed,budget,evict,fits", EVICTION_TABLE)
def test_plan_eviction(residents, needed, budget, evict, fits) -> None:
    plan = plan_eviction(
        [Resident(m, g * GIB, t, p, b) for m, g, t, p, b in residents], needed * GIB, budget * GIB
    )
    assert (plan.evict, plan.fits) == (evict, fits)


async def test_single_flight_load() -> None:
    reg = registry(model("a", 1, max_concurrency="10"))

    async def use() -> None:
        async with reg.lease("a"):
            await asyncio.sleep(0.01)

    await asyncio.gather(*(use() for _ in range(10)))
    assert FakeEngine.loads == ["a"]


async def test_resolve_ids_aliases_globs_and_never_paths() -> None:
    reg = registry(model("a", 1, aliases='["alias-a", "gpt-4o*"]') + model("b", 1))
    assert reg.resolve("a") == "a"
    assert reg.resolve("alias-a") == "a"
    assert reg.resolve("gpt-4o-mini") == "a"
    assert reg.resolve("b:latest") == "b"
    for bad in ("c", "../a", "/etc/passwd", "hub/a-1", "", "A"):
        with pytest.raises(UnknownModelError):
            reg.resolve(bad)


async def test_ttl_unloads_after_idle() -> None:
    reg = registry(model("a", 1, ttl="0.2"))
    async with reg.lease("a"):
        pass
    slot = reg.slots()[0]
    assert slot.state == SlotState.LOADED
    await asyncio.sleep(0.4)
    assert slot.state == SlotState.UNLOADED


async def test_keep_alive_zero_unloads_right_after_use() -> None:
    reg = registry(model("a", 1))
    async with reg.lease("a", keep_alive=0.0):
        pass
    await asyncio.sleep(0.05)
    assert reg.slots()[0].state == SlotState.UNLOADED


async def test_budget_evicts_lru_and_pin_survives() -> None:
    reg = registry(
        '[server]\nmemory_budget = "10GiB"\n'
        + model("pinned", 4, pin="true")
        + model("old", 4)
        + model("new", 4)
    )
    for mid in ("pinned", "old"):
        async with reg.lease(mid):
            pass
    async with reg.lease("new"):
        pass
    states = {s.model_id: s.state for s in reg.slots()}
    assert states == {"pinned": SlotState.LOADED, "old": SlotState.UNLOADED, "new": SlotState.LOADED}


async def test_model_that_cannot_fit_gets_a_clear_error() -> None:
    reg = registry('[server]\nmemory_budget = "4GiB"\n' + model("big", 8))
    with pytest.raises(InsufficientMemoryError, match="needs about"):
        async with reg.lease("big"):
            pass


async def test_queue_depth_bounded() -> None:
    reg = registry("[server.limits]\nqueue_depth = 2\n" + model("a", 1))
    release = asyncio.Event()

    async def hold() -> None:
        async with reg.lease("a"):
            await release.wait()

    holders = [asyncio.create_task(hold())]
    await asyncio.sleep(0.2)  # loaded and running
    holders += [asyncio.create_task(hold()) for _ in range(2)]  # 2 waiting: the queue is full
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFullError):
        async with reg.lease("a"):
            pass
    release.set()
    await asyncio.gather(*holders)


async def test_failed_load_is_reported_and_retried_with_backoff() -> None:
    reg = registry(model("broken", 1) + model("ok", 1))
    with pytest.raises(ModelUnavailableError, match="weights are corrupt"):
        async with reg.lease("broken"):
            pass
    slot = next(s for s in reg.slots() if s.model_id == "broken")
    assert slot.state == SlotState.FAILED and slot.error == "weights are corrupt"
    with pytest.raises(ModelUnavailableError) as again:  # within the backoff: no new load attempt
        async with reg.lease("broken"):
            pass
    assert again.value.retry_after and FakeEngine.loads.count("broken") == 1
    async with reg.lease("ok"):  # other models are unaffected
        pass


async def test_reload_swaps_only_what_changed() -> None:
    reg = registry(model("keep", 1) + model("change", 1) + model("gone", 1))
    for mid in ("keep", "change", "gone"):
        async with reg.lease(mid):
            pass
    keep_engine = next(s for s in reg.slots() if s.model_id == "keep").engine
    new = parse_profile(
        model("keep", 1, aliases='["k"]') + model("change", 2) + model("added", 1), "t.toml", apply_env=False
    ).profile
    plan = reg.apply_profile(new)
    assert (plan.added, plan.removed, plan.reloaded, plan.metadata_only) == (
        ("added",),
        ("gone",),
        ("change",),
        ("keep",),
    )
    await asyncio.sleep(0.05)
    slots = {s.model_id: s for s in reg.slots()}
    assert slots["keep"].engine is keep_engine and reg.resolve("k") == "keep"
    assert slots["change"].state == SlotState.UNLOADED and slots["added"].state == SlotState.UNLOADED
    with pytest.raises(UnknownModelError):
        reg.resolve("gone")


async def test_reloaded_model_waits_for_in_flight_requests_of_the_old_version() -> None:
    reg = registry(model("m", 1))
    order: list[str] = []
    release = asyncio.Event()

    async def old_request() -> None:
        async with reg.lease("m") as lease:
            order.append(f"old:{lease.spec.source}")
            await release.wait()
            order.append("old done")

    task = asyncio.create_task(old_request())
    await asyncio.sleep(0.1)
    reg.apply_profile(parse_profile(model("m", 2), "t.toml", apply_env=False).profile)

    async def new_request() -> None:
        async with reg.lease("m") as lease:
            order.append(f"new:{lease.spec.source}")

    new_task = asyncio.create_task(new_request())
    await asyncio.sleep(0.1)
    assert order == ["old:hub/m-1"]  # the new version waits
    release.set()
    await asyncio.gather(task, new_task)
    assert order == ["old:hub/m-1", "old done", "new:hub/m-2"]


async def test_priority_gate_admits_interactive_first_then_fifo() -> None:
    from mlx_serve.daemon.admission import INTERACTIVE, NORMAL, PriorityGate

    gate = PriorityGate(1)
    await gate.acquire()
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await gate.acquire(priority)
        order.append(name)
        gate.release()

    tasks = [
        asyncio.create_task(wait(n, p)) for n, p in (("a", NORMAL), ("b", NORMAL), ("gone", INTERACTIVE))
    ]
    tasks.append(asyncio.create_task(wait("fim", INTERACTIVE)))
    await asyncio.sleep(0.01)
    tasks[2].cancel()  # a waiter that leaves is skipped, its place not lost
    await asyncio.sleep(0.01)
    gate.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == ["fim", "a", "b"]
    await asyncio.wait_for(gate.acquire(), 1)  # every place came back
