"""Localhost is not a security boundary: every web page the user opens can reach 127.0.0.1.

- Host allow-list (DNS rebinding, Ollama CVE-2024-28224): the Host header must name `localhost`,
  `127.0.0.1`, `[::1]`, a host from `[server] allowed_hosts`, the address the daemon is bound to,
  or the local address the connection arrived on, bare or with the port the connection arrived
  on. Matching is exact (case-insensitive): no suffixes, no `.local` names, no trailing dots. An
  allowed_hosts entry with a port matches only that port (for a reverse proxy on another port).
  An IP literal equal to the connection's own local address is safe: a rebinding page can only
  make a browser send its own host name.
- CORS closed by default: a request carrying an `Origin` not listed in `[server] cors_origins`
  gets 403 (browsers add Origin to cross-origin requests, SDKs never send one), so a foreign page
  can neither read nor trigger anything. A listed origin gets `Access-Control-Allow-Origin` with
  exactly that origin and `Vary: Origin`; never a wildcard, never credentials, never a
  private-network-access grant.

Both checks run before authentication and before any route, and answer in the dialect's error shape.

- Per-connection request limit (`[server.limits] max_requests_per_connection`, like nginx's
  keepalive_requests): the response to a keep-alive connection's Nth request says
  `Connection: close` and the connection closes after it, streamed responses included. Counted
  when a response is prepared, read from the current profile (applies on reload).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mlx_serve.apis.errors import ErrorInfo, dialect_for_path, error_response
from mlx_serve.daemon.metrics import Metrics
from mlx_serve.daemon.state import DaemonState
from mlx_serve.profiles.schema import Profile

log = logging.getLogger("mlx_serve.hardening")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = ("", "0.0.0.0", "::", "[::]")
_HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_\-]+(?:\.[a-z0-9_\-]+)*)(?::([0-9]{1,5}))?")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]{1,64}$")
PREFLIGHT_METHODS = "GET, POST, DELETE, OPTIONS"
EXPOSE_HEADERS = "Retry-After, X-Request-Id"
CORS_ORIGIN = "cors_origin"  # request key: the allowed Origin of this request


@dataclass(frozen=True)
class HostPolicy:
    hosts: frozenset[str]  # lowercase; "name" or "name:port"
    origins: frozenset[str]  # lowercase

    @classmethod
    def from_profile(cls, profile: Profile | None) -> HostPolicy:
        hosts = set(DEFAULT_HOSTS)
        origins: set[str] = set()
        if profile is not None:
            hosts.update(h.strip().lower() for h in profile.server.allowed_hosts if h.strip())
            bind = profile.server.host.strip().lower()
            if bind not in WILDCARD_BINDS:
                hosts.add(_bracket(bind))
            origins.update(o.lower() for o in profile.server.cors_origins)
        return cls(frozenset(hosts), frozenset(origins))


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_allowed(value: str, policy: HostPolicy, local: tuple[str, int] | None) -> bool:
    """Is this Host header value one of ours? `local` is the connection's (address, port)."""
    value = value.lower()
    match = _HOST_RE.fullmatch(value)
    if match is None:
        return False
    name, port = match.group(1), match.group(2)
    if port is not None:
        if value in policy.hosts:  # an allowed_hosts entry with its own port
            return True
        if local is None or int(port) != local[1]:
            return False
    if name in policy.hosts:
        return True
    return local is not None and _is_address(name) and name == _bracket(local[0].lower())


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _local_address(request: web.Request) -> tuple[str, int] | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]).split("%")[0], int(sockname[1])
    return None  # a unix socket: only the bare names are allowed


def _shown(value: str) -> str:
    clean = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in value)
    return clean if len(clean) <= 100 else clean[:100] + "..."


class Hardening:
    def __init__(self, state: DaemonState, metrics: Metrics) -> None:
        self._state = state
        self._metrics = metrics
        self._profile: Profile | None = None
        self._policy = HostPolicy.from_profile(None)
        # requests answered per connection, keyed by its transport (gone with the connection)
        self._served: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    @property
    def policy(self) -> HostPolicy:
        profile = self._state.profile  # allowed_hosts / cors_origins edits apply on reload
        if profile is not self._profile:
            self._profile, self._policy = profile, HostPolicy.from_profile(profile)
        return self._policy

    @property
    def max_requests_per_connection(self) -> int:
        profile = self._state.profile
        return profile.server.limits.max_requests_per_connection if profile is not None else 1000

    def count_request(self, request: web.Request) -> bool:
        """Count a response on its connection; True when it must be the connection's last."""
        transport = request.transport
        if transport is None:  # the client is gone already
            return False
        try:
            served = self._served.get(transport, 0) + 1
            self._served[transport] = served
        except TypeError:  # a transport that cannot be weakly referenced: count nothing
            return False
        return served >= self.max_requests_per_connection

    def reject(self, request: web.Request, reason: str, message: str) -> web.Response:
        self._metrics.auth_failures.labels(reason).inc()
        log.debug("refused %s %s: %s", request.method, request.path, reason)
        prefix = self._profile.apis.prefix if self._profile is not None else ""
        return error_response(dialect_for_path(request.path, prefix), ErrorInfo(403, "permission", message))


HARDENING: web.AppKey[Hardening] = web.AppKey("hardening", Hardening)


@web.middleware
async def hardening_middleware(request: web.Request, handler):
    hardening = request.app[HARDENING]
    policy = hardening.policy
    hosts = request.headers.getall("Host", [])
    if len(hosts) != 1 or not hosts[0].strip():
        return hardening.reject(request, "host", "the request needs exactly one non-empty Host header")
    if not host_allowed(hosts[0], policy, _local_address(request)):
        return hardening.reject(
            request, "host",
            f"Host {_shown(hosts[0])!r} is not allowed; if this name is yours, add it to server.allowed_hosts",
        )  # fmt: skip
    origins = request.headers.getall("Origin", [])
    if origins:
        if len(origins) != 1 or origins[0].lower() not in policy.origins:
            return hardening.reject(
                request, "origin",
                f"cross-origin requests from {_shown(origins[0])!r} are not allowed;"
                " list the origin in server.cors_origins to allow it",
            )  # fmt: skip
        request[CORS_ORIGIN] = origins[0]
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return _preflight(request)
    return await handler(request)


def _preflight(request: web.Request) -> web.Response:
    asked = request.headers.get("Access-Control-Request-Headers", "")
    allowed = [h.strip() for h in asked.split(",") if _TOKEN_RE.match(h.strip())][:64]
    headers = {"Access-Control-Allow-Methods": PREFLIGHT_METHODS, "Access-Control-Max-Age": "600"}
    if allowed:
        headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
    return web.Response(status=204, headers=headers)


async def _connection_limit(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs once per response, streamed ones too, after aiohttp has chosen
    the Connection header but before it is sent, so both are set here."""
    if request.app[HARDENING].count_request(request):
        response.force_close()
        response.headers["Connection"] = "close"


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: also covers streamed responses, whose headers leave before a middleware
    could touch them."""
    origin = request.get(CORS_ORIGIN)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if request.app[HARDENING].policy.origins:
        vary = response.headers.get("Vary", "")
        if "origin" not in vary.lower():
            response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


class QuietMalformedRequests(logging.Filter):
    """aiohttp logs every malformed request (oversize or duplicate headers, no Host...) at ERROR with
    a traceback that quotes up to 100 bytes of the offending line, which may be an API key, and any
    client can flood the log that way. The client still gets its 400; the log gets one debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("refused a malformed request: %s (HTTP %s)", type(exc).__name__, exc.code)
            return False
        return True


def setup_hardening(app: web.Application, state: DaemonState, metrics: Metrics) -> None:
    app[HARDENING] = Hardening(state, metrics)
    app.on_response_prepare.append(_cors_headers)
    app.on_response_prepare.append(_connection_limit)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietMalformedRequests) for f in server_log.filters):
        server_log.addFilter(QuietMalformedRequests())
