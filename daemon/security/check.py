"""Checking one request against the [auth] policy and the key set: which key it presents,
constant-time digest matching, expiry, API and model scopes, per-key rate limits.

Last-used times live in memory only (GET /keys/status, which `keys list` reads); writing them
back would race with `keys revoke` in the CLI and could resurrect a revoked key.
"""

from __future__ import annotations

import fnmatch
import functools
import hmac
import json
import math
import time
from dataclasses import dataclass

from aiohttp import web

from mlx_serve.apis.context import REGISTRY
from mlx_serve.apis.errors import dialect_for_path
from mlx_serve.apis.scope import MODEL_SCOPE
from mlx_serve.daemon.admin import is_loopback
from mlx_serve.daemon.metrics import Metrics
from mlx_serve.daemon.security.keys import MAX_SECRET_CHARS, KeyRecord, digest_of
from mlx_serve.daemon.security.keyset import KeySet

EXEMPT_ON_LOOPBACK = frozenset({"/health", "/ready", "/status", "/reload", "/keys/refresh", "/keys/status"})


class AuthFailure(Exception):
    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        # metrics label: missing | invalid | expired | scope | rate_limited | keyring_unavailable
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


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


def model_allowed(request: web.Request, record: KeyRecord, name: str) -> bool:
    """A glob may name what clients request (an alias) or the profile id it resolves to."""
    candidates = {name}
    try:
        candidates.add(request.app[REGISTRY].resolve(name))
    except Exception:
        pass  # unknown name: only the name itself can match; the route answers 404 if it may
    return any(fnmatch.fnmatchcase(c, glob) for c in candidates for glob in record.models)


class KeyVerifier:
    def __init__(self, keyset: KeySet, metrics: Metrics) -> None:
        self.keyset = keyset
        self.metrics = metrics
        self._buckets: dict[str, TokenBucket] = {}
        self._bucket_records: tuple[KeyRecord, ...] = ()
        self.last_used: dict[str, float] = {}

    # the key set's life cycle, for the daemon's wiring (the reloader calls on_reload)
    async def refresh(self) -> dict:
        return await self.keyset.refresh()

    def report(self) -> dict:
        return self.keyset.report()

    def on_reload(self, result: str) -> None:
        self.keyset.on_reload(result)

    def _exempt(self, request: web.Request, loopback: bool) -> bool:
        if not loopback:
            return False
        profile = self.keyset.state.profile
        metrics_path = profile.metrics.path if profile is not None else "/metrics"
        return request.path in EXEMPT_ON_LOOPBACK or request.path == metrics_path

    async def check(self, request: web.Request) -> str | None:
        """Raise AuthFailure, or return the name of the key used (None when no key was needed).
        A key limited to some models also leaves its scope on the request (apis/scope.py)."""
        auth = self.keyset.settings
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
        if self.keyset.error is not None:
            raise AuthFailure(
                503, "keyring_unavailable",
                f"API keys are unavailable: {self.keyset.error}; retrying every {auth.refresh_interval:.0f}s",
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
        if record.models:
            request[MODEL_SCOPE] = functools.partial(model_allowed, request, record)
        return record.name

    def _match(self, secret: str) -> KeyRecord | None:
        if len(secret) > MAX_SECRET_CHARS:
            return None
        digest = digest_of(secret)
        found = None
        for (
            record
        ) in self.keyset.records:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(record.digest, digest):
                found = record
        return found

    async def _check_scope(self, request: web.Request, record: KeyRecord) -> None:
        profile = self.keyset.state.profile
        dialect = route_dialect(request.path, profile.apis.prefix if profile else "")
        if record.apis and dialect is not None and dialect not in record.apis:
            raise AuthFailure(403, "scope", f"API key {record.name!r} may not use the {dialect} API")
        if not record.models:
            return
        for name in await requested_models(request, dialect):
            if not model_allowed(request, record, name):
                shown = name if len(name) <= 128 else name[:128] + "..."
                raise AuthFailure(403, "scope", f"API key {record.name!r} may not use model {shown!r}")

    def _check_rate(self, record: KeyRecord, now: float) -> None:
        if record.rate_per_min is None:
            return
        records = self.keyset.records
        if records is not self._bucket_records:  # the key set was re-read: forget removed keys
            names = {r.name for r in records}
            self._buckets = {n: b for n, b in self._buckets.items() if n in names}
            self._bucket_records = records
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
