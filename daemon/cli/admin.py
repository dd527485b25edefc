"""`mlx-serve status | ps | reload`: talk to the running daemon over loopback HTTP."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from mlx_serve.profiles.loader import ProfileError, load_profile


def add_admin_commands(commands: argparse._SubParsersAction) -> None:
    for name, handler, help_text in (
        ("status", _status, "the running daemon: version, uptime, profile, last reload, models"),
        ("ps", _ps, "models of the running daemon: state, memory, TTL left, requests in flight"),
        ("reload", _reload, "re-read the profile now (the daemon also does this on every save)"),
    ):
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--url", help="daemon URL (default: from the profile, http://127.0.0.1:11435)")
        parser.add_argument("--profile", help="profile to read the daemon's address from")
        parser.add_argument("--json", action="store_true", help="print the raw JSON")
        parser.set_defaults(handler=handler)


def daemon_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    try:
        server = load_profile(args.profile).profile.server
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{server.port}"
    except ProfileError:
        return "http://127.0.0.1:11435"


def _call(args: argparse.Namespace, path: str, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(daemon_url(args) + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"mlx-serve is not reachable at {daemon_url(args)}: {exc}", file=sys.stderr)
        print("start it with `mlx-serve serve` or `mlx-serve service start`", file=sys.stderr)
        raise SystemExit(1) from None


def _status(args: argparse.Namespace) -> int:
    code, body = _call(args, "/status")
    if args.json or code != 200:
        print(json.dumps(body, indent=2))
        return 0 if code == 200 else 1
    profile = body["profile"]
    print(f"mlx-serve {body['version']}  pid {body['pid']}  up {_duration(body['uptime_seconds'])}")
    print(f"profile   {profile['path']}  sha256 {str(profile['sha256'])[:12]}")
    outcome = "ok" if profile["last_reload_successful"] else "FAILED"
    print(f"reload    {outcome} at {time.strftime('%H:%M:%S', time.localtime(profile['last_reload_at']))}: "
          f"{profile['last_reload_summary']}")  # fmt: skip
    for error in profile["errors"]:
        print(f"          {error}")
    _print_models(body["models"])
    return 0 if profile["last_reload_successful"] else 1


def _ps(args: argparse.Namespace) -> int:
    code, body = _call(args, "/status")
    if args.json:
        print(json.dumps(body["models"], indent=2))
    else:
        _print_models(body["models"])
    return 0 if code == 200 else 1


def _reload(args: argparse.Namespace) -> int:
    code, body = _call(args, "/reload", method="POST")
    profile = body.get("profile", {})
    print(f"{body.get('result')}: {profile.get('last_reload_summary')}")
    for error in profile.get("errors", []):
        print(error, file=sys.stderr)
    return 0 if code == 200 else 1


def _print_models(models: list[dict[str, Any]]) -> None:
    print(
        f"{'MODEL':24} {'ENGINE':10} {'STATE':9} {'MEMORY':>9} {'TTL LEFT':>9} {'ACTIVE':>6} {'WAITING':>7}"
    )
    for m in models:
        memory = f"{m['memory_bytes'] / 2**20:.0f} MiB" if m["memory_bytes"] else "-"
        ttl = "pinned" if m["pinned"] else ("-" if m["expires_in"] is None else _duration(m["expires_in"]))
        print(
            f"{m['id']:24} {m['engine']:10} {m['state']:9} {memory:>9} {ttl:>9} {m['active']:>6} {m['waiting']:>7}"
        )
        if m["error"]:
            print(f"  error: {m['error']}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
