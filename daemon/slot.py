"""One model's place in the registry: its state, engine, leases, TTL timer and load failures."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from mlx_serve.daemon.admission import PriorityGate
from mlx_serve.engines.base import Engine
from mlx_serve.engines.errors import EngineError
from mlx_serve.profiles.schema import ModelSpec

BACKOFF_SECONDS = (1.0, 5.0, 15.0, 60.0)


class SlotState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass(eq=False)
class Slot:
    model_id: str
    spec: ModelSpec
    engine: Engine | None = None
    state: SlotState = SlotState.UNLOADED
    error: str | None = None
    failures: int = 0
    failed_at: float = 0.0
    load_task: asyncio.Task | None = None
    load_seconds: float = 0.0
    reserved_bytes: int = 0  # the estimate held for it while it loads (the memory plan counts it)
    active: int = 0
    waiting: int = 0
    last_used: float = 0.0
    keep_alive: float | None | str = "default"  # per-request override (Ollama keep_alive)
    removed: bool = False
    ready_after: asyncio.Event | None = None  # set when the previous version finished draining
    expires_at: float | None = None
    _ttl_handle: asyncio.TimerHandle | None = None
    gate: PriorityGate = field(init=False)
    idle: asyncio.Event = field(init=False)

    def __post_init__(self) -> None:
        self.gate = PriorityGate(self.spec.max_concurrency)
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0

    @property
    def ttl_seconds(self) -> float | None:
        return self.spec.ttl_seconds if self.keep_alive == "default" else self.keep_alive  # type: ignore[return-value]

    def memory_bytes(self) -> int:
        return sum(self.memory_breakdown().values())

    def memory_breakdown(self) -> dict[str, int]:
        """{"weights": bytes, "kv_cache": bytes}; zeros when not loaded (or the engine cannot say)."""
        if self.engine is None or self.state != SlotState.LOADED:
            return {"weights": 0, "kv_cache": 0}
        try:
            return {kind: int(n) for kind, n in self.engine.memory_breakdown().items()}
        except Exception:
            return {"weights": 0, "kv_cache": 0}

    async def wait_idle(self) -> None:
        while self.busy:
            self.idle.clear()
            await self.idle.wait()

    def schedule_ttl(self, seconds: float, callback: Callable[[], None]) -> None:
        self.cancel_ttl()
        loop = asyncio.get_running_loop()
        self.expires_at = time.time() + seconds
        self._ttl_handle = loop.call_later(seconds, callback)

    def cancel_ttl(self) -> None:
        if self._ttl_handle is not None:
            self._ttl_handle.cancel()
        self._ttl_handle, self.expires_at = None, None

    def mark_failed(self, reason: str) -> None:
        self.state, self.error, self.load_task = SlotState.FAILED, reason, None
        self.failures += 1
        self.failed_at = time.monotonic()

    def retry_in(self) -> float:
        """Seconds until the next load attempt is allowed (backoff grows with failures)."""
        if self.state != SlotState.FAILED:
            return 0.0
        backoff = BACKOFF_SECONDS[min(self.failures, len(BACKOFF_SECONDS)) - 1]
        return max(0.0, self.failed_at + backoff - time.monotonic())


def total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 2**30


def estimate_bytes(model_id: str, spec: ModelSpec) -> int:
    """A pre-load estimate from the weight files on disk (plus 20% for KV cache and buffers);
    0 when the files are not local yet (downloads are accounted after load)."""
    from mlx_serve.engines.sources.resolve import is_local_source, resolve_source

    if not (spec.source.startswith("package:") or is_local_source(spec.source)):
        return 0
    try:
        path = resolve_source(model_id, spec)
    except EngineError:
        return 0
    files = [path] if path.is_file() else [*path.glob("*.safetensors"), *path.glob("*.gguf")]
    return int(sum(Path(f).stat().st_size for f in files) * 1.2)
