"""Memory-budget eviction planning: a pure function, table-tested.

Given the resident models and a model that needs `needed` bytes, pick idle unpinned models to
unload, least recently used first, until it fits. None when it cannot fit even then.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    model_id: str
    bytes: int
    last_used: float
    pinned: bool = False
    busy: bool = False  # has leases or waiters: never evicted


@dataclass(frozen=True)
class EvictionPlan:
    evict: tuple[str, ...]
    fits: bool
    blocking: tuple[str, ...] = ()  # what would have to go but cannot (pinned or busy)


def plan_eviction(residents: list[Resident], needed: int, budget: int) -> EvictionPlan:
    used = sum(r.bytes for r in residents)
    if used + needed <= budget:
        return EvictionPlan((), True)
    evictable = sorted((r for r in residents if not r.pinned and not r.busy), key=lambda r: r.last_used)
    chosen: list[str] = []
    for resident in evictable:
        if used + needed <= budget:
            break
        chosen.append(resident.model_id)
        used -= resident.bytes
    if used + needed <= budget:
        return EvictionPlan(tuple(chosen), True)
    blocking = tuple(r.model_id for r in residents if r.pinned or r.busy)
    return EvictionPlan((), False, blocking)
