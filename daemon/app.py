"""The aiohttp application: middlewares, daemon endpoints, and the dialect routes from apis/."""

from __future__ import annotations

import logging
import os
import time
import uuid

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mlx_serve.apis.context import FIM_TASKS, GENERATION_OBSERVERS, REGISTRY, RESPONSE_STORE
from mlx_serve.apis.errors import ErrorInfo, classify, dialect_for_path, error_response
from mlx_serve.daemon import __version__
from mlx_serve.daemon.metrics import Metrics, endpoint_of, status_class
from mlx_serve.daemon.registry import Registry
from mlx_serve.daemon.security.hardening import hardening_middleware, setup_hardening
from mlx_serve.daemon.security.middleware import auth_middleware, setup_auth
from mlx_serve.daemon.state import DaemonState
from mlx_serve.daemon.status import models_status
from mlx_serve.daemon.warmup import EngineWarmup

log = logging.getLogger("mlx_serve.app")
STATE = web.AppKey("state", DaemonState)
METRICS = web.AppKey("metrics", Metrics)
WARMUP = web.AppKey("warmup", EngineWarmup)
_HTTP_KINDS = {
    401: "authentication",
    403: "permission",
    404: "not_found",
    413: "too_large",
    429: "rate_limit",
}


def _prefix(request: web.Request) -> str:
    profile = request.app[STATE].profile
    return profile.apis.prefix if profile else ""


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every failure leaves in the dialect's own error shape; nothing escapes as a bare 500."""
    dialect = dialect_for_path(request.path, _prefix(request))
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_KINDS.get(exc.status, "invalid_request" if exc.status < 500 else "internal")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 413:
            message = "request body is too large"
        elif exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        return error_response(dialect, ErrorInfo(exc.status, kind, message))
    except Exception as exc:
        info = classify(exc)
        if info.status >= 500 and info.kind == "internal":
            log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(dialect, info)


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    request["request_id"] = request_id  # streaming handlers send headers before we get the response back
    response = await handler(request)
    response.headers["X-Request-Id"] = request_id
    return response


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    started = time.monotonic()
    response = None
    try:
        response = await handler(request)
        return response
    finally:
        metrics = request.app[METRICS]
        endpoint = _endpoint_label(request)
        dialect = _metrics_dialect(request, endpoint)
        # A handler cancelled by a client disconnect has no response: count it as 499 (nginx's "client closed").
        status = response.status if response is not None else 499
        metrics.requests.labels(dialect, endpoint, status_class(status)).inc()
        metrics.request_duration.labels(dialect, endpoint).observe(time.monotonic() - started)


_DAEMON_ROUTES = ("/health", "/ready", "/status", "/reload", "/keys/", "/metrics")


def _current_metrics_path(request: web.Request) -> str:
    profile = request.app[STATE].profile
    return profile.metrics.path if profile else "/metrics"


def _endpoint_label(request: web.Request) -> str:
    """The route template; the metrics path is served by a middleware, not a route, so name it here."""
    endpoint = endpoint_of(request)
    if endpoint == "unmatched" and request.path == _current_metrics_path(request):
        return request.path
    return endpoint


def _metrics_dialect(request: web.Request, endpoint: str) -> str:
    """The dialect label; the daemon's own endpoints (and scrapes) are "daemon", not OpenAI traffic."""
    if endpoint == _current_metrics_path(request) or endpoint.startswith(_DAEMON_ROUTES):
        return "daemon"
    return dialect_for_path(request.path, _prefix(request))


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus exposition; never loads a model."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def serves_metrics_here(profile) -> bool:
    """Whether the main listener answers the metrics path (not disabled, not on its own listener)."""
    return profile is None or (profile.metrics.enabled and profile.metrics.listen is None)


@web.middleware
async def metrics_route_middleware(request: web.Request, handler):
    """Serve /metrics from the live profile, so [metrics] enabled/path/listen apply without a restart.

    Innermost, after auth: the metrics path keeps its loopback exemption and nothing else changes.
    """
    profile = request.app[STATE].profile
    if request.path == _current_metrics_path(request) and serves_metrics_here(profile):
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        return await metrics_endpoint(request)
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    """Liveness: always cheap, never loads a model."""
    state = request.app[STATE]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "profile": state.profile_report(),
        }
    )


async def ready(request: web.Request) -> web.Response:
    """Readiness: 503 until the profile is valid and preload models are up. Never loads a model."""
    state = request.app[STATE]
    registry: Registry = request.app[REGISTRY]
    problems = []
    if state.profile is None:
        problems.append("profile is invalid")
    if registry.preloads_pending:
        problems.append("preload models are still loading")
    if not request.app[WARMUP].done.is_set():
        problems.append("engine libraries are still being imported")
    body = {
        "ready": not problems,
        "problems": problems,
        "profile": state.profile_report(),
        "models": models_status(registry),
    }
    return web.json_response(body, status=200 if not problems else 503)


def create_app(state: DaemonState, registry: Registry, metrics: Metrics) -> web.Application:
    profile = state.profile
    limits = profile.server.limits if profile else None
    app = web.Application(
        # Host allow-list and CORS first (a rebinding page gets nothing, not even a 401), then
        # metrics and error shaping, then API keys, closest to the routes.
        middlewares=[
            request_id_middleware,
            hardening_middleware,
            metrics_middleware,
            errors_middleware,
            auth_middleware,
            metrics_route_middleware,
        ],
        client_max_size=limits.max_body_bytes if limits else 16 * 1024 * 1024,
    )
    app[STATE] = state
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[WARMUP] = EngineWarmup()
    app[GENERATION_OBSERVERS] = [metrics.on_generation]
    app[RESPONSE_STORE] = {}
    app[FIM_TASKS] = {}
    setup_hardening(app, state, metrics)
    setup_auth(app, state, metrics)  # the key set loads in app startup; /keys/refresh, /keys/status
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    add_dialect_routes(app, profile)
    return app


def create_metrics_app(metrics: Metrics, state: DaemonState) -> web.Application:
    """The separate metrics listener ([metrics] listen = "host:port"); the path follows the profile."""

    async def metrics_only(request: web.Request) -> web.Response:
        profile = state.profile
        if profile is not None and request.path == profile.metrics.path:
            return await metrics_endpoint(request)
        raise web.HTTPNotFound()

    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/{tail:.*}", metrics_only)
    return app


def add_dialect_routes(app: web.Application, profile) -> None:
    from mlx_serve.apis.anthropic.routes import add_routes as add_anthropic
    from mlx_serve.apis.ollama.routes import add_routes as add_ollama
    from mlx_serve.apis.openai.routes import add_routes as add_openai

    prefix = profile.apis.prefix if profile else ""
    if profile is None or profile.apis.openai:
        add_openai(app, prefix)
    if profile is None or profile.apis.anthropic:
        add_anthropic(app, prefix)
    if profile is None or profile.apis.ollama:
        add_ollama(app, prefix)
