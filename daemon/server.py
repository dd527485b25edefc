"""Process life: load the profile, start the HTTP listener, wait for a signal, drain, exit 0.

The process never forks or daemonizes (launchd / systemd supervise it). An invalid profile does
not stop it from starting: it serves /health, reports not-ready, and recovers by itself when the
file is fixed (no supervisor restart loop). A second SIGTERM/SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from mlx_serve.daemon.admin import add_admin_routes
from mlx_serve.daemon.app import WARMUP, create_app, create_metrics_app
from mlx_serve.daemon.listener import Address, Listener, MetricsListener
from mlx_serve.daemon.metrics import Metrics
from mlx_serve.daemon.registry import Registry
from mlx_serve.daemon.reloader import Reloader
from mlx_serve.daemon.security.middleware import VERIFIER, unauthenticated_network_problem
from mlx_serve.daemon.state import DaemonState
from mlx_serve.profiles.loader import ProfileError, load_profile, server_of_invalid
from mlx_serve.profiles.schema import Profile, Server

log = logging.getLogger("mlx_serve.server")
DEFAULT_PORT = 11435


def run(profile_path: str | None, *, host: str | None = None, port: int | None = None) -> int:
    state = DaemonState(profile_path=profile_path)
    try:
        state.set_profile(load_profile(profile_path))
        server = state.profile.server
    except ProfileError as exc:
        state.set_profile_errors(exc.problems)
        for problem in exc.problems:
            log.error("profile: %s", problem)
        server = _server_despite(profile_path)
        log.error("starting without models; fix the profile and it is applied automatically")
    address = Address(
        host or (server.host if server else "127.0.0.1"),
        port if port is not None else (server.port if server else DEFAULT_PORT),
        server.unix_socket if server else None,
    )
    if problem := unauthenticated_network_problem(state.profile, address.host):
        log.error("cannot start: %s", problem)
        return 2
    try:
        return asyncio.run(_serve(state, address, pinned=host is not None or port is not None))
    except OSError as exc:  # e.g. the port is taken: a fatal start error, non-zero for the supervisor
        log.error("cannot start: %s", exc)
        return 1


async def _serve(state: DaemonState, address: Address, pinned: bool) -> int:
    profile = state.profile or Profile()
    registry = Registry(profile)
    reloader = Reloader(state, registry)
    metrics = Metrics(state, registry)
    reloader.listeners.append(metrics.record_reload)
    app = create_app(state, registry, metrics)
    reloader.listeners.append(app[VERIFIER].on_reload)  # a reload may change [auth]: re-read the keys
    add_admin_routes(app, state, reloader)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that goes away stops its generation (ARCHITECTURE.md "Verified facts")
        # aiohttp waits this long for handlers, then cancels them and waits again; generations end
        # themselves at 85% of it (registry.begin_drain), so the drain stays within drain_timeout,
        # which launchd's ExitTimeOut and systemd's TimeoutStopSec are sized against.
        shutdown_timeout=profile.server.drain_timeout,
        keepalive_timeout=profile.server.limits.idle_timeout,
        max_field_size=profile.server.limits.max_header_bytes,
        max_line_size=profile.server.limits.max_header_bytes,
        max_headers=profile.server.limits.max_headers,  # more header lines: 400 before any handler
        access_log=None,
    )
    await runner.setup()
    listener = Listener(runner, address, pinned)
    await listener.start()
    reloader.listeners.append(lambda result: _follow_address(state, listener, result))
    metrics_runner = web.AppRunner(create_metrics_app(metrics, state), access_log=None)
    await metrics_runner.setup()
    metrics_listener = MetricsListener(metrics_runner)
    await metrics_listener.follow(_metrics_listen(state.profile), strict=True)
    reloader.listeners.append(lambda result: _follow_metrics(state, metrics_listener, result))
    log.info("mlx-serve %d listening on %s (profile: %s)", os.getpid(), address, state.profile_label)
    app[WARMUP].start(state.profile)  # after the listener: /health answers while libraries import
    reloader.listeners.append(
        lambda result: app[WARMUP].start(state.profile) if result == "success" else None
    )
    registry.preload()
    reloader.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info(
            "received %s: draining (up to %.0fs)", signal.Signals(signum).name, profile.server.drain_timeout
        )
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, reloader.request_reload)
    await stop.wait()
    reloader.stop()
    # Generations still running when 85% of the budget is spent end with a proper final event.
    registry.begin_drain(profile.server.drain_timeout * 0.85)
    await runner.cleanup()  # stops accepting, waits for in-flight requests up to drain_timeout
    await metrics_runner.cleanup()
    await registry.shutdown()
    log.info("stopped")
    return 0


def _server_despite(profile_path: str | None) -> Server | None:
    """Where to listen while the profile is invalid: its own [server] table if that is valid."""
    server = server_of_invalid(profile_path)
    if server is None:
        log.error("the profile's [server] table is invalid too: listening on the defaults")
    else:
        log.warning("listening where the profile's [server] table says, although the profile is invalid")
    return server


def _follow_address(state: DaemonState, listener: Listener, result: str) -> None:
    """After a successful reload, move the listener if [server] host/port/unix_socket changed."""
    if result != "success" or state.profile is None:
        return
    server = state.profile.server
    wanted = Address(server.host, server.port, server.unix_socket)
    if wanted != listener.address and not listener.pinned:
        asyncio.get_running_loop().create_task(listener.move_to(wanted))


def _metrics_listen(profile: Profile | None) -> str | None:
    if profile is None or not profile.metrics.enabled:
        return None
    return profile.metrics.listen


def _follow_metrics(state: DaemonState, metrics_listener: MetricsListener, result: str) -> None:
    """After a successful reload, open, move or close the separate metrics listener."""
    if result == "success" and state.profile is not None:
        asyncio.get_running_loop().create_task(metrics_listener.follow(_metrics_listen(state.profile)))
