"""Ollama's model endpoints: GET /api/tags, POST /api/show, GET /api/ps.

/api/tags and /api/ps never load a model. /api/show answers from the files on disk (or the loaded
engine); it loads the model only when its files are not local yet (a hub repo not downloaded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from typing import Any

from aiohttp import web

from mlx_serve.apis.body import read_body
from mlx_serve.apis.context import registry as get_registry
from mlx_serve.apis.errors import RequestError
from mlx_serve.apis.scope import model_visible
from mlx_serve.engines.kind import is_apple_silicon
from mlx_serve.engines.types import EngineInfo

from .catalog import ModelFacts, details, listed_names, show_body, static_facts, tagged, with_engine
from .protocol import ShowRequest
from .translate import rfc3339

FOREVER_SECONDS = 292 * 365 * 86400  # what Ollama shows for keep_alive -1 (its max duration)


def find_slot(registry: Any, model_id: str) -> Any:
    slot = next((s for s in registry.slots() if s.model_id == model_id), None)
    if slot is None:  # removed by a profile reload since the name was resolved
        raise RequestError(f"model {model_id!r} is not in this server's profile", "model", 404, "not_found")
    return slot


def loaded_info(slot: Any) -> EngineInfo | None:
    """The engine's info when the model is loaded (the registry's state is a str enum)."""
    engine = slot.engine
    if slot.state != "loaded" or engine is None:
        return None
    try:
        return engine.info()
    except Exception:  # unloaded between the check and the call
        return None


async def facts_for(slots: list[Any]) -> list[ModelFacts]:
    """File facts (read off the event loop: GGUF headers, tokenizer files), then engine info."""
    facts = await asyncio.to_thread(lambda: [static_facts(s.model_id, s.spec) for s in slots])
    out = []
    for slot, fact in zip(slots, facts, strict=True):
        info = loaded_info(slot)
        fact = with_engine(fact, info) if info else fact
        if not fact.digest:
            fact = _with_digest(fact, slot.spec.source)
        out.append(fact)
    return out


def _with_digest(facts: ModelFacts, source: str) -> ModelFacts:
    return dataclasses.replace(facts, digest=hashlib.sha256(source.encode()).hexdigest())


def visible_names(request: web.Request, slot: Any) -> list[str]:
    """The names /api/tags lists for a model that the request's API key may use."""
    return [n for n in listed_names(slot.model_id, list(slot.spec.aliases)) if model_visible(request, n)]


async def tags(request: web.Request) -> web.Response:
    registry = get_registry(request)
    all_slots = registry.slots()
    names_of = {s.model_id: visible_names(request, s) for s in all_slots}
    slots = [s for s in all_slots if names_of[s.model_id]]  # a key limited to some models sees those only
    now = time.time()
    models = []
    for slot, facts in zip(slots, await facts_for(slots), strict=True):
        for name in names_of[slot.model_id]:
            models.append(
                {
                    "name": tagged(name),
                    "model": tagged(name),
                    "modified_at": rfc3339(facts.modified_at or now),
                    "size": facts.size,
                    "digest": facts.digest,
                    "details": details(facts),
                }
            )
    return web.json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    req = await read_body(request, ShowRequest)
    registry = get_registry(request)
    model_id = registry.resolve(req.model_name)
    slot = find_slot(registry, model_id)
    (facts,) = await facts_for([slot])
    if not facts.known:  # files not local: loading the model is the only way to know it
        async with registry.lease(req.model_name) as lease:
            facts = with_engine(facts, lease.engine.info())
    body = show_body(model_id, slot.spec, facts, rfc3339(facts.modified_at or time.time()))
    return web.json_response(body)


def _expires_at(slot: Any, now: float) -> float:
    ttl = None if slot.spec.pin else slot.ttl_seconds
    if ttl is None:
        return now + FOREVER_SECONDS
    return slot.expires_at or now + ttl  # no timer while requests are running: it starts after them


async def ps(request: web.Request) -> web.Response:
    registry = get_registry(request)
    loaded = [
        s for s in registry.slots() if loaded_info(s) is not None and model_visible(request, s.model_id)
    ]
    now = time.time()
    models = []
    for slot, facts in zip(loaded, await facts_for(loaded), strict=True):
        size = slot.memory_bytes()
        models.append(
            {
                "name": tagged(slot.model_id),
                "model": tagged(slot.model_id),
                "size": size,
                "digest": facts.digest,
                "details": details(facts),
                "expires_at": rfc3339(_expires_at(slot, now)),
                "size_vram": size if is_apple_silicon() else 0,  # unified memory on Apple Silicon
                "context_length": facts.context_length,
            }
        )
    return web.json_response({"models": models})
