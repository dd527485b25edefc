"""What dialect routes need from the daemon, as aiohttp app keys (apis/ never imports daemon/)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

# The registry (daemon.registry.Registry): resolve(name), lease(name, keep_alive), slots(), profile.
REGISTRY: web.AppKey[Any] = web.AppKey("registry", Any)
# Observers of finished generations (metrics); each gets (dialect, model_id, GenerationStats).
GENERATION_OBSERVERS: web.AppKey[list] = web.AppKey("generation_observers", list)
# Per-process store of OpenAI Responses for previous_response_id.
RESPONSE_STORE: web.AppKey[dict] = web.AppKey("response_store", dict)


def registry(request: web.Request) -> Any:
    return request.app[REGISTRY]


def limits(request: web.Request) -> Any:
    return request.app[REGISTRY].profile.server.limits


# The running fill-in-the-middle request per (client, model), so a new one can supersede it.
FIM_TASKS: web.AppKey[dict] = web.AppKey("fim_tasks", dict)
