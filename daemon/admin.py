"""Daemon endpoints for the CLI (`mlx-serve status|ps|reload`). Loopback clients only: they expose
the profile path and control reloads, which a remote client has no business with."""

from __future__ import annotations

import ipaddress
import os
import time

from aiohttp import web

from mlx_serve.apis.context import REGISTRY
from mlx_serve.daemon import __version__
from mlx_serve.daemon.reloader import Reloader
from mlx_serve.daemon.state import DaemonState
from mlx_serve.daemon.status import models_status

STATE: web.AppKey[DaemonState] = web.AppKey("admin_state", DaemonState)
RELOADER: web.AppKey[Reloader] = web.AppKey("reloader", Reloader)


def is_loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return request.transport is not None  # a unix socket is local by construction
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def _require_loopback(request: web.Request) -> None:
    if not is_loopback(request):
        raise web.HTTPForbidden(text="admin endpoints answer loopback clients only")


async def status(request: web.Request) -> web.Response:
    _require_loopback(request)
    state = request.app[STATE]
    registry = request.app[REGISTRY]
    return web.json_response(
        {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "profile": state.profile_report(),
            "reloads": state.reloads,
            "memory_budget_bytes": registry.budget_bytes,
            "models": models_status(registry),
        }
    )


async def reload(request: web.Request) -> web.Response:
    _require_loopback(request)
    result = await request.app[RELOADER].reload()
    state = request.app[STATE]
    body = {"result": result, "profile": state.profile_report()}
    return web.json_response(body, status=200 if result != "failure" else 422)


def add_admin_routes(app: web.Application, state: DaemonState, reloader: Reloader) -> None:
    app[STATE] = state
    app[RELOADER] = reloader
    app.router.add_get("/status", status)
    app.router.add_post("/reload", reload)
