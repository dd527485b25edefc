"""The aiohttp application: middlewares and routes. Dialect routes live in apis/."""

from __future__ import annotations

import time

from aiohttp import web

from . import __version__
from .state import DaemonState

STATE = web.AppKey("state", DaemonState)


async def health(request: web.Request) -> web.Response:
    """Liveness: always cheap, never loads a model."""
    state = request.app[STATE]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "profile": {
                "path": state.profile_label,
                "loaded": state.profile is not None,
                "last_reload_successful": state.last_reload.successful,
                "errors": list(state.last_reload.errors),
            },
        }
    )


def create_app(state: DaemonState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/health", health)
    return app
