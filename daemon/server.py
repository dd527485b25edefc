"""Process life: load the profile, start the HTTP listener, wait for a signal, drain, exit 0.

The process never forks or daemonizes (launchd / systemd supervise it). An invalid profile does
not stop it from starting: it serves /health, reports not-ready, and recovers when the file is
fixed (no supervisor restart loop).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from mlx_serve.profiles.loader import ProfileError, load_profile

from .app import create_app
from .state import DaemonState

log = logging.getLogger("mlx_serve.server")
DEFAULT_PORT = 11435


def run(profile_path: str | None, *, host: str | None = None, port: int | None = None) -> int:
    state = DaemonState(profile_path=profile_path)
    try:
        state.set_profile(load_profile(profile_path))
    except ProfileError as exc:
        state.set_profile_errors(exc.problems)
        for problem in exc.problems:
            log.error("profile: %s", problem)
    server = state.profile.server if state.profile else None
    bind_host = host or (server.host if server else "127.0.0.1")
    bind_port = port if port is not None else (server.port if server else DEFAULT_PORT)
    try:
        return asyncio.run(_serve(state, bind_host, bind_port))
    except OSError as exc:  # e.g. port in use: a fatal start error, non-zero for the supervisor
        log.error("cannot start: %s", exc)
        return 1


async def _serve(state: DaemonState, host: str, port: int) -> int:
    app = create_app(state)
    # handler_cancellation: a client that goes away must stop its generation (DESIGN §4).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("mlx-serve listening on http://%s:%d (profile: %s)", host, port, state.profile_label)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now")
            raise SystemExit(1)
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    await runner.cleanup()
    log.info("stopped")
    return 0
