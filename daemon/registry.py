"""The registry: the single owner of model state.

Requests take a lease on a model for their lifetime. The first lease loads it (single-flight:
concurrent first requests share one load); the last release starts its TTL clock. Loading a model
that does not fit the memory budget evicts idle unpinned models, least recently used first
(planned by the pure `plan_eviction`). Profile reloads swap slots: unchanged models are untouched,
changed ones drain their in-flight requests before the new version loads.

Invariant: no `await` between a check of a slot's state and the change it decides.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mlx_serve.daemon.admission import NORMAL
from mlx_serve.daemon.errors import (
    InsufficientMemoryError,
    ModelUnavailableError,
    QueueFullError,
    ShuttingDownError,
    UnknownModelError,
)
from mlx_serve.daemon.eviction import Resident, plan_eviction
from mlx_serve.daemon.memory import release_memory
from mlx_serve.daemon.slot import Slot, SlotState, estimate_bytes, total_memory
from mlx_serve.engines.base import Engine
from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.sources.resolve import resolve_source
from mlx_serve.profiles.diff import ReloadPlan, diff
from mlx_serve.profiles.schema import ModelSpec, Profile
from mlx_serve.profiles.units import parse_size

log = logging.getLogger("mlx_serve.registry")
EngineFactory = Callable[[str, ModelSpec, Mapping[str, ModelSpec]], Engine]
Listener = Callable[[str, str, Slot], None]  # (event, reason, slot): load, load_failed, unload


@dataclass(frozen=True)
class Lease:
    model_id: str
    engine: Engine
    spec: ModelSpec
    queue_wait: float
    load_wait: float


class Registry:
    def __init__(
        self,
        profile: Profile,
        engine_factory: EngineFactory | None = None,
        estimator: Callable[[str, ModelSpec], int] = estimate_bytes,
        fetcher: Callable[[str, ModelSpec], object] = resolve_source,
    ) -> None:
        if engine_factory is None:
            from mlx_serve.engines.factory import create_engine

            engine_factory = create_engine
        self._factory = engine_factory
        self._estimate = estimator  # bytes a model will need, before it is loaded
        self._fetch = fetcher  # puts a model's files on disk (downloads hub repos)
        self._profile = profile
        self._slots: dict[str, Slot] = {mid: Slot(mid, spec) for mid, spec in profile.models.items()}
        self._memory_lock = asyncio.Lock()
        self._closing = False
        self.drain_deadline: float | None = None  # monotonic time after which streams are ended
        self._background: set[asyncio.Task] = set()
        self.listeners: list[Listener] = []

    # ---- names -----------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """A requested model name -> profile model id: id, alias, then glob alias. Never a path."""
        if not isinstance(name, str) or not name:
            raise UnknownModelError(str(name))
        candidates = [name] + ([name.removesuffix(":latest")] if name.endswith(":latest") else [])
        for candidate in candidates:
            if candidate in self._slots:
                return candidate
            for mid, slot in self._slots.items():
                if candidate in slot.spec.aliases:
                    return mid
            for mid, slot in self._slots.items():
                if any(
                    fnmatch.fnmatchcase(candidate, a) for a in slot.spec.aliases if any(c in a for c in "*?[")
                ):
                    return mid
        raise UnknownModelError(name)

    @property
    def profile(self) -> Profile:
        return self._profile

    def slots(self) -> list[Slot]:
        return list(self._slots.values())

    @property
    def budget_bytes(self) -> int:
        return parse_size(self._profile.server.memory_budget, total_memory())

    # ---- leases ----------------------------------------------------------------------------
    @asynccontextmanager
    async def lease(
        self, name: str, keep_alive: float | None | str = "default", priority: int = NORMAL
    ) -> AsyncIterator[Lease]:
        """Hold a model for one request. keep_alive (seconds, None = forever) sets how long the
        model stays after this request, Ollama-style; "default" means the profile's ttl. The
        last request to finish decides."""
        if self._closing:
            raise ShuttingDownError()
        slot = self._slots[self.resolve(name)]
        limit = self._profile.server.limits.queue_depth
        if slot.waiting >= limit:
            raise QueueFullError(slot.model_id, slot.waiting)
        slot.waiting += 1
        slot.cancel_ttl()
        started = time.monotonic()
        try:
            if slot.ready_after is not None:
                await slot.ready_after.wait()
            engine = await self._ensure_loaded(slot)
            loaded_at = time.monotonic()
            await slot.gate.acquire(priority)
        except BaseException:
            slot.waiting -= 1
            self._after_release(slot)
            raise
        slot.waiting -= 1
        slot.active += 1
        now = time.monotonic()
        try:
            yield Lease(slot.model_id, engine, slot.spec, now - loaded_at, loaded_at - started)
        finally:
            slot.gate.release()
            slot.active -= 1
            slot.keep_alive = keep_alive
            slot.last_used = time.monotonic()
            self._after_release(slot)

    def _after_release(self, slot: Slot) -> None:
        if slot.busy:
            return
        slot.idle.set()
        if slot.state != SlotState.LOADED or slot.spec.pin or slot.removed:
            return
        ttl = slot.ttl_seconds
        if ttl is None:
            return
        slot.schedule_ttl(ttl, lambda: self._spawn(self._unload_if_idle(slot, "ttl")))

    async def _ensure_loaded(self, slot: Slot) -> Engine:
        if slot.state == SlotState.LOADED and slot.engine is not None:
            return slot.engine
        if slot.state == SlotState.FAILED and slot.load_task is None:
            wait = slot.retry_in()
            if wait > 0:
                raise ModelUnavailableError(slot.model_id, slot.error or "load failed", retry_after=wait)
        if slot.load_task is None:
            slot.state = SlotState.LOADING
            slot.load_task = asyncio.create_task(self._load(slot))
        return await asyncio.shield(slot.load_task)

    async def _load(self, slot: Slot) -> Engine:
        started = time.monotonic()
        try:
            # Download first, outside the memory lock: a long download must not hold up other loads.
            await asyncio.to_thread(self._fetch, slot.model_id, slot.spec)
            # The lock covers the decision (what fits, whom to evict) and the reservation, not the
            # load itself: a slow or hostile load (a template rendering to its time limit, a big
            # tokenizer) must not hold up every other model's load.
            async with self._memory_lock:
                slot.reserved_bytes = await self._make_room(slot)
            engine = self._factory(slot.model_id, slot.spec, self._profile.models)
            try:
                await engine.load()
            finally:
                slot.reserved_bytes = 0
            release_memory()  # what the load only needed for a moment (the tokenizer's JSON, ...)
        except InsufficientMemoryError:
            slot.state, slot.load_task = SlotState.UNLOADED, None
            raise
        except Exception as exc:
            reason = exc.reason if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            slot.mark_failed(reason)
            log.error("model %s failed to load: %s", slot.model_id, reason)
            self._notify("load_failed", reason, slot)
            raise ModelUnavailableError(slot.model_id, reason, retry_after=slot.retry_in()) from None
        slot.engine, slot.state, slot.load_task = engine, SlotState.LOADED, None
        slot.error, slot.failures = None, 0
        slot.load_seconds = time.monotonic() - started
        slot.last_used = time.monotonic()
        log.info(
            "model %s loaded in %.2fs (%.0f MiB)",
            slot.model_id,
            slot.load_seconds,
            slot.memory_bytes() / 2**20,
        )
        self._notify("load", "", slot)
        return engine

    async def _make_room(self, slot: Slot) -> int:
        """Evict what must go for `slot` to fit; returns the bytes to reserve while it loads."""
        needed = self._estimate(slot.model_id, slot.spec)
        residents = [
            Resident(s.model_id, s.memory_bytes(), s.last_used, s.spec.pin, s.busy)
            for s in self._slots.values()
            if s is not slot and s.state == SlotState.LOADED
        ] + [  # loads under way hold what they reserved, and cannot be evicted
            Resident(s.model_id, s.reserved_bytes, s.last_used, True, True)
            for s in self._slots.values()
            if s is not slot and s.reserved_bytes
        ]
        plan = plan_eviction(residents, needed, self.budget_bytes)
        if not plan.fits:
            raise InsufficientMemoryError(slot.model_id, needed, self.budget_bytes, list(plan.blocking))
        for model_id in plan.evict:
            log.info("evicting %s to make room for %s", model_id, slot.model_id)
            await self._unload(self._slots[model_id], "pressure")
        return needed

    async def _unload_if_idle(self, slot: Slot, reason: str) -> None:
        if slot.busy or slot.state != SlotState.LOADED:
            return
        await self._unload(slot, reason)

    async def _unload(self, slot: Slot, reason: str) -> None:
        engine = slot.engine
        slot.cancel_ttl()
        slot.engine, slot.state = None, SlotState.UNLOADED
        if engine is not None:
            try:
                await engine.unload()
            except Exception:
                log.exception("unloading %s failed", slot.model_id)
            release_memory()
            log.info("model %s unloaded (%s)", slot.model_id, reason)
            self._notify("unload", reason, slot)

    async def unload(self, name: str, reason: str = "manual") -> None:
        slot = self._slots[self.resolve(name)]
        await slot.wait_idle()
        await self._unload(slot, reason)

    # ---- profile reloads -------------------------------------------------------------------
    def apply_profile(self, new: Profile) -> ReloadPlan:
        """Swap in a new profile; only what changed is touched. Runs synchronously (no awaits),
        so no request can observe a half-applied profile; draining happens in the background."""
        plan = diff(self._profile, new)
        for mid in plan.removed:
            slot = self._slots.pop(mid)
            slot.removed = True
            self._spawn(self._retire(slot, "removed"))
        for mid in plan.added:
            self._slots[mid] = Slot(mid, new.models[mid])
        for change in plan.changed:
            old = self._slots[change.model_id]
            spec = new.models[change.model_id]
            if not change.needs_reload:
                old.spec = spec
                continue
            fresh = Slot(change.model_id, spec)
            if old.state != SlotState.UNLOADED or old.busy:
                fresh.ready_after = asyncio.Event()
                self._spawn(self._retire(old, "reload", then=fresh.ready_after))
            old.removed = True
            self._slots[change.model_id] = fresh
        self._profile = new
        self.preload()
        return plan

    async def _retire(self, slot: Slot, reason: str, then: asyncio.Event | None = None) -> None:
        try:
            await slot.wait_idle()
            if slot.load_task is not None:
                await asyncio.gather(slot.load_task, return_exceptions=True)
            await self._unload(slot, reason)
        finally:
            if then is not None:
                then.set()

    def preload(self) -> None:
        for slot in self._slots.values():
            if slot.spec.preload and slot.state == SlotState.UNLOADED and slot.load_task is None:
                self._spawn(self._preload(slot))

    async def _preload(self, slot: Slot) -> None:
        try:
            if slot.ready_after is not None:
                await slot.ready_after.wait()
            await self._ensure_loaded(slot)
            self._after_release(slot)
        except Exception as exc:  # already logged and recorded on the slot
            log.debug("preload of %s failed: %s", slot.model_id, exc)

    @property
    def preloads_pending(self) -> bool:
        return any(
            s.spec.preload and s.state in (SlotState.UNLOADED, SlotState.LOADING)
            for s in self._slots.values()
        )

    # ---- lifecycle -------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _notify(self, event: str, reason: str, slot: Slot) -> None:
        for listener in self.listeners:
            listener(event, reason, slot)

    @property
    def in_flight(self) -> int:
        return sum(s.active + s.waiting for s in self._slots.values())

    def begin_drain(self, seconds: float) -> None:
        """Shutdown started: refuse new leases; running streams end themselves by the deadline."""
        self._closing = True
        self.drain_deadline = time.monotonic() + seconds

    @property
    def drain_expired(self) -> bool:
        return self.drain_deadline is not None and time.monotonic() >= self.drain_deadline

    async def shutdown(self) -> None:
        """Refuse new leases, then unload everything (the server drains requests first)."""
        self._closing = True
        for slot in list(self._slots.values()):
            slot.cancel_ttl()
            if slot.load_task is not None:
                await asyncio.gather(slot.load_task, return_exceptions=True)
            await self._unload(slot, "shutdown")
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
