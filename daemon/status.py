"""JSON views of the registry for /ready, /status, `mlx-serve status` and `mlx-serve ps`."""

from __future__ import annotations

import time
from typing import Any

from mlx_serve.apis.redact import redact_home
from mlx_serve.daemon.registry import Registry
from mlx_serve.daemon.slot import Slot, SlotState
from mlx_serve.engines.kind import engine_kind


def slot_status(slot: Slot) -> dict[str, Any]:
    info = None
    if slot.state == SlotState.LOADED and slot.engine is not None:
        engine_info = slot.engine.info()
        info = {
            "context_length": engine_info.context_length,
            "capabilities": sorted(engine_info.capabilities),
        }
    return {
        "id": slot.model_id,
        "aliases": list(slot.spec.aliases),
        "engine": engine_kind(slot.spec),
        "state": slot.state.value,
        "error": redact_home(slot.error) if slot.error else slot.error,  # ~ for the home directory
        "memory_bytes": slot.memory_bytes(),
        "active": slot.active,
        "waiting": slot.waiting,
        "pinned": slot.spec.pin,
        "ttl_seconds": slot.ttl_seconds,
        "expires_in": None if slot.expires_at is None else round(max(0.0, slot.expires_at - time.time()), 1),
        "info": info,
    }


def models_status(registry: Registry) -> list[dict[str, Any]]:
    return [slot_status(slot) for slot in registry.slots()]
