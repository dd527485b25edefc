"""API keys in the daemon: the aiohttp wiring (middleware, /keys/refresh, /keys/status).

The work is split by job:
- security/keyset.py: the key set, read from the keyring at start, on reload, on `keys` changes and
  periodically; never per request. A locked or broken keyring fails closed and is retried.
- security/check.py: one request against the policy and the key set (401 / 403 / 429 / 503).
- security/policy.py: bind-address checks (a network bind without keys refuses to start).

Refusals answer in the dialect's error shape and are counted by reason; logs name the reason
only, never a key or a digest.
"""

from __future__ import annotations

import logging

from aiohttp import web

from mlx_serve.apis.errors import ErrorInfo, dialect_for_path, error_response
from mlx_serve.daemon.admin import is_loopback
from mlx_serve.daemon.metrics import Metrics
from mlx_serve.daemon.security.check import AuthFailure, KeyVerifier
from mlx_serve.daemon.security.keyset import KeySet
from mlx_serve.daemon.security.policy import unauthenticated_network_problem
from mlx_serve.daemon.state import DaemonState

__all__ = ["KEY_NAME", "VERIFIER", "auth_middleware", "setup_auth", "unauthenticated_network_problem"]

log = logging.getLogger("mlx_serve.auth")
VERIFIER: web.AppKey[KeyVerifier] = web.AppKey("key_verifier", KeyVerifier)
KEY_NAME = "api_key_name"  # request key: the name of the key a request authenticated with
_KINDS = {401: "authentication", 403: "permission", 429: "rate_limit", 503: "unavailable"}


def _prefix(request: web.Request) -> str:
    profile = request.app[VERIFIER].keyset.state.profile
    return profile.apis.prefix if profile else ""


def count_failure(metrics: Metrics, reason: str) -> None:
    metrics.auth_failures.labels(reason).inc()
    if reason == "rate_limited":
        metrics.rate_limited.inc()


@web.middleware
async def auth_middleware(request: web.Request, handler):
    try:
        request[KEY_NAME] = await request.app[VERIFIER].check(request)
    except AuthFailure as failure:
        count_failure(request.app[VERIFIER].metrics, failure.reason)
        log.debug("refused %s %s: %s", request.method, request.path, failure.reason)
        info = ErrorInfo(
            failure.status, _KINDS[failure.status], failure.message, retry_after=failure.retry_after
        )
        response = error_response(dialect_for_path(request.path, _prefix(request)), info)
        if failure.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="mlx-serve"'
        return response
    return await handler(request)


def _require_loopback(request: web.Request) -> None:
    if not is_loopback(request):
        raise web.HTTPForbidden(text="admin endpoints answer loopback clients only")


async def keys_refresh(request: web.Request) -> web.Response:
    _require_loopback(request)
    report = await request.app[VERIFIER].refresh()
    return web.json_response(report, status=200 if report["available"] else 503)


async def keys_status(request: web.Request) -> web.Response:
    _require_loopback(request)
    verifier = request.app[VERIFIER]
    return web.json_response({**verifier.report(), "last_used": dict(verifier.last_used)})


def setup_auth(app: web.Application, state: DaemonState, metrics: Metrics) -> KeyVerifier:
    keyset = KeySet(state)
    verifier = KeyVerifier(keyset, metrics)
    app[VERIFIER] = verifier
    app.cleanup_ctx.append(keyset.lifecycle)
    app.router.add_post("/keys/refresh", keys_refresh)
    app.router.add_get("/keys/status", keys_status)
    return verifier
