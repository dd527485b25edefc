"""Daemon-side API key checks: policy, verification, scopes, per-key rate limits.

The key set is read from the keyring at start, after every successful profile reload, on
`POST /keys/refresh` (loopback only; `mlx-serve keys ...` calls it after a change) and every
`[auth] refresh_interval` seconds; never per request. Keyring calls run on a worker thread.

If the keyring is locked, missing or broken the daemon keeps serving what needs no key (loopback
clients under the default policy), refuses key-protected access with a 503 that says why, drops
the key set it had (a locked keyring locks the keys too) and retries at the refresh interval.

Last-used times live in memory only (GET /keys/status, which `keys list` reads); writing them
back would race with `keys revoke` in the CLI and could resurrect a revoked key.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mlx_serve.apis.context import REGISTRY
from mlx_serve.apis.errors import ErrorInfo, dialect_for_path, error_response
from mlx_serve.profiles.schema import Auth

from .admin import is_loopback
from .keys import MAX_SECRET_CHARS, KeyRecord, KeyStore, KeyStoreUnavailable, backend_label, digest_of
from .metrics import Metrics
from .state import DaemonState

log = logging.getLogger("mlx_serve.auth")
LOAD_TIMEOUT = 30.0  # a keyring that does not answer (a prompt nobody sees) counts as unavailable
FIRST_LOAD_WAIT = 10.0  # how long startup waits for the first load before serving without keys
EXEMPT_ON_LOOPBACK = frozenset({"/health", "/ready", "/status", "/reload", "/keys/refresh", "/keys/status"})


class AuthFailure(Exception):
    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        # metrics label: missing | invalid | expired | scope | rate_limited | keyring_unavailable
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


_KINDS = {401: "authentication", 403: "permission", 429: "rate_limit", 503: "unavailable"}


@dataclass
class TokenBucket:
    """rate_per_min requests per minute, bursts up to the same number."""

    rate_per_min: int
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 if a request may go now (and counts it), else the seconds until one may."""
        per_second = self.rate_per_min / 60.0
        self.tokens = min(float(self.rate_per_min), self.tokens + (now - self.updated) * per_second)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / per_second


def presented_key(request: web.Request) -> str | None:
    """The client's key from `Authorization: Bearer`, `x-api-key` or `api-key` (in that order)."""
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for header in ("x-api-key", "api-key"):
        if value := request.headers.get(header, "").strip():
            return value
    return None


def route_dialect(path: str, prefix: str) -> str | None:
    """The dialect a path belongs to, or None for the daemon's own endpoints (health, metrics...)."""
    if prefix:
        if path != prefix and not path.startswith(prefix + "/"):
            return None
        path = path[len(prefix) :] or "/"
    if path == "/" or path == "/api" or path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/"):
        return dialect_for_path(path)
    return None


class KeyVerifier:
    def __init__(self, state: DaemonState, metrics: Metrics) -> None:
        self._state = state
        self.metrics = metrics
        self._keys: tuple[KeyRecord, ...] = ()
        self._error: str | None = "the key set has not been loaded yet"
        self._loaded_at: float | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self._load_lock = asyncio.Lock()
        self._loads: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._logged_error: str | None = None
        self.last_used: dict[str, float] = {}

    @property
    def settings(self) -> Auth:
        profile = self._state.profile
        return profile.auth if profile is not None else Auth()

    # ---- loading --------------------------------------------------------------------------------
    async def refresh(self) -> dict[str, Any]:
        """Re-read the key set now. Loads run one at a time and each starts after its call, so a
        refresh asked for after a `keys` change never returns the result of an older read. A
        cancelled caller (a timeout) does not cancel the load."""
        task = asyncio.ensure_future(self._load_serialized())
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        await asyncio.shield(task)
        return self.report()

    async def _load_serialized(self) -> None:
        async with self._load_lock:
            await self._load()

    async def _load(self) -> None:
        service = self.settings.keyring_service
        store = KeyStore(service)
        try:
            records = await asyncio.wait_for(asyncio.to_thread(self._read, store), LOAD_TIMEOUT)
        except TimeoutError:
            self._set_unavailable(f"the keyring did not answer within {LOAD_TIMEOUT:.0f}s")
            return
        except KeyStoreUnavailable as exc:
            self._set_unavailable(str(exc))
            return
        changed = {(r.name, r.digest) for r in records} != {(r.name, r.digest) for r in self._keys}
        self._keys = tuple(records)
        self._loaded_at = time.time()
        names = {r.name for r in records}
        self._buckets = {n: b for n, b in self._buckets.items() if n in names}
        if self._error is not None and self._logged_error is not None:
            log.info("API keys are available again")
        first, self._error, self._logged_error = self._error is not None, None, None
        if changed or first:  # the periodic refresh stays quiet while nothing changes
            log.info(
                "API keys: %d loaded from keyring service %r (%s)",
                len(records), service, backend_label(store.backend),
            )  # fmt: skip

    @staticmethod
    def _read(store: KeyStore) -> list[KeyRecord]:
        return store.list()

    def _set_unavailable(self, message: str) -> None:
        self._keys = ()  # fail closed: a locked keyring locks the keys it holds
        self._error = message
        if message != self._logged_error:
            # Loud only when someone may need a key: a loopback-only daemon under the default
            # policy serves everyone without one.
            profile = self._state.profile
            needed = self.settings.require_keys == "always" or (
                profile is not None and not _is_loopback_host(profile.server.host)
            )
            log.log(
                logging.WARNING if needed else logging.INFO,
                "API keys are unavailable: %s; key-protected access is refused, retrying every %.0fs",
                message, self.settings.refresh_interval,
            )  # fmt: skip
            self._logged_error = message

    def request_refresh(self) -> None:
        self._wake.set()

    def on_reload(self, result: str) -> None:
        """Reloader listener: the profile may name another keyring service or policy."""
        if result == "success":
            self.request_refresh()

    async def _periodic(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.refresh_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if self.settings.require_keys == "never":
                continue
            try:
                await self.refresh()
            except Exception:  # never let the refresher die
                log.exception("API key refresh failed")

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: first load before serving (bounded), then the refresher."""
        if self.settings.require_keys != "never":
            try:
                await asyncio.wait_for(self.refresh(), FIRST_LOAD_WAIT)
            except TimeoutError:
                log.warning("the keyring is slow to answer; serving while API keys load")
        task = asyncio.create_task(self._periodic())
        yield
        task.cancel()

    def report(self) -> dict[str, Any]:
        return {
            "available": self._error is None,
            "error": self._error,
            "keys": len(self._keys),
            "loaded_at": self._loaded_at,
            "service": self.settings.keyring_service,
            "require_keys": self.settings.require_keys,
        }

    # ---- checking -------------------------------------------------------------------------------
    def _exempt(self, request: web.Request, loopback: bool) -> bool:
        if not loopback:
            return False
        profile = self._state.profile
        metrics_path = profile.metrics.path if profile is not None else "/metrics"
        return request.path in EXEMPT_ON_LOOPBACK or request.path == metrics_path

    async def check(self, request: web.Request) -> str | None:
        """Raise AuthFailure, or return the name of the key used (None when no key was needed)."""
        auth = self.settings
        loopback = is_loopback(request)
        policy = auth.require_keys
        if policy == "never" and not loopback and not auth.allow_unauthenticated_network:
            policy = "non_loopback"  # bound to the network by --host or a reload: never open it silently
        if policy == "never" or (policy == "non_loopback" and loopback):
            return None
        if self._exempt(request, loopback):
            return None
        secret = presented_key(request)
        if secret is None:
            raise AuthFailure(
                401, "missing",
                "an API key is required: send it as 'Authorization: Bearer msk-...' or in an 'x-api-key' header"
                " (create one with `mlx-serve keys create NAME`)",
            )  # fmt: skip
        if self._error is not None:
            raise AuthFailure(
                503, "keyring_unavailable",
                f"API keys are unavailable: {self._error}; retrying every {auth.refresh_interval:.0f}s",
                retry_after=auth.refresh_interval,
            )  # fmt: skip
        record = self._match(secret)
        if record is None:
            raise AuthFailure(401, "invalid", "invalid API key")
        now = time.time()
        if record.expired(now):
            day = time.strftime("%Y-%m-%d", time.localtime(record.expires))
            raise AuthFailure(401, "expired", f"API key {record.name!r} expired on {day}")
        await self._check_scope(request, record)
        self._check_rate(record, time.monotonic())
        self.last_used[record.name] = now
        return record.name

    def _match(self, secret: str) -> KeyRecord | None:
        if len(secret) > MAX_SECRET_CHARS:
            return None
        digest = digest_of(secret)
        found = None
        for record in self._keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(record.digest, digest):
                found = record
        return found

    async def _check_scope(self, request: web.Request, record: KeyRecord) -> None:
        profile = self._state.profile
        dialect = route_dialect(request.path, profile.apis.prefix if profile else "")
        if record.apis and dialect is not None and dialect not in record.apis:
            raise AuthFailure(403, "scope", f"API key {record.name!r} may not use the {dialect} API")
        if not record.models:
            return
        for name in await requested_models(request, dialect):
            if not self._model_allowed(request, record, name):
                shown = name if len(name) <= 128 else name[:128] + "..."
                raise AuthFailure(403, "scope", f"API key {record.name!r} may not use model {shown!r}")

    @staticmethod
    def _model_allowed(request: web.Request, record: KeyRecord, name: str) -> bool:
        """A glob may name what clients request (an alias) or the profile id it resolves to."""
        candidates = {name}
        try:
            candidates.add(request.app[REGISTRY].resolve(name))
        except Exception:
            pass  # unknown name: only the name itself can match; the route answers 404 if it may
        return any(fnmatch.fnmatchcase(c, glob) for c in candidates for glob in record.models)

    def _check_rate(self, record: KeyRecord, now: float) -> None:
        if record.rate_per_min is None:
            return
        bucket = self._buckets.get(record.name)
        if bucket is None or bucket.rate_per_min != record.rate_per_min:
            bucket = TokenBucket(record.rate_per_min, float(record.rate_per_min), now)
            self._buckets[record.name] = bucket
        wait = bucket.take(now)
        if wait > 0:
            raise AuthFailure(
                429, "rate_limited",
                f"API key {record.name!r} is limited to {record.rate_per_min} requests per minute",
                retry_after=max(1.0, math.ceil(wait)),
            )  # fmt: skip


async def requested_models(request: web.Request, dialect: str | None) -> list[str]:
    """The model names a request asks for: the path's {model}, or the JSON body's model (Ollama: name)."""
    names = [request.match_info["model"]] if "model" in request.match_info else []
    if request.method in ("POST", "PUT", "DELETE") and request.can_read_body:
        raw = await request.read()  # cached: the route reads the same bytes; 413 past client_max_size
        try:
            data = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError):
            data = None  # the route rejects the body with a 400 of its own
        if isinstance(data, dict):
            for field_name in ("model", "name") if dialect == "ollama" else ("model",):
                value = data.get(field_name)
                if isinstance(value, str):
                    names.append(value)
    return names


def unauthenticated_network_problem(profile: Any, bind_host: str) -> str | None:
    """Why binding bind_host under this profile's [auth] would expose every model without a key."""
    auth = profile.auth if profile is not None else Auth()
    if auth.require_keys != "never" or auth.allow_unauthenticated_network or _is_loopback_host(bind_host):
        return None
    return (
        f"binding {bind_host!r} with auth.require_keys = 'never' serves every model to the network without"
        " a key; set auth.allow_unauthenticated_network = true in the profile if that is really meant"
    )


def _is_loopback_host(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- aiohttp wiring -------------------------------------------------------------------------------

VERIFIER: web.AppKey[KeyVerifier] = web.AppKey("key_verifier", KeyVerifier)
KEY_NAME = "api_key_name"  # request key: the name of the key a request authenticated with


def _prefix(request: web.Request) -> str:
    profile = request.app[VERIFIER]._state.profile
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
    verifier = KeyVerifier(state, metrics)
    app[VERIFIER] = verifier
    app.cleanup_ctx.append(verifier.lifecycle)
    app.router.add_post("/keys/refresh", keys_refresh)
    app.router.add_get("/keys/status", keys_status)
    return verifier
