"""The [auth] policy questions that do not depend on a request: is a bind address loopback, and
would binding it under this profile serve every model to the network without a key."""

from __future__ import annotations

import ipaddress
from typing import Any

from mlx_serve.profiles.schema import Auth


def is_loopback_host(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unauthenticated_network_problem(profile: Any, bind_host: str) -> str | None:
    """Why binding bind_host under this profile's [auth] would expose every model without a key."""
    auth = profile.auth if profile is not None else Auth()
    if auth.require_keys != "never" or auth.allow_unauthenticated_network or is_loopback_host(bind_host):
        return None
    return (
        f"binding {bind_host!r} with auth.require_keys = 'never' serves every model to the network without"
        " a key; set auth.allow_unauthenticated_network = true in the profile if that is really meant"
    )
