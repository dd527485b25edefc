"""`mlx-serve keys create | list | revoke | rotate`: API keys in the OS keyring.

The secret is printed once, alone on stdout (so `KEY=$(mlx-serve keys create ci)` works); all
other output goes to stderr. After a change the running daemon is told to re-read its keys
(POST /keys/refresh); if none is running, it reads them when it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import date, datetime
from typing import Any

from mlx_serve.daemon.cli.admin import daemon_url
from mlx_serve.daemon.security.keys import DIALECTS, KeyRecord, KeyStore, KeyStoreError, KeyStoreUnavailable
from mlx_serve.profiles.loader import ProfileError, load_profile


def add_keys_commands(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--profile", help="profile to read [auth] keyring_service and the daemon's address from"
    )
    common.add_argument(
        "--service", help="keyring service name (default: the profile's auth.keyring_service)"
    )
    common.add_argument("--url", help="daemon URL to notify (default: from the profile)")

    keys = commands.add_parser(
        "keys", help="API keys (stored in the OS keyring): create, list, revoke, rotate"
    )
    actions = keys.add_subparsers(dest="keys_action", metavar="ACTION")
    keys.set_defaults(handler=lambda _args: keys.print_help() or 2)

    create = actions.add_parser("create", parents=[common], help="create a key; the secret is printed once")
    create.add_argument("name")
    create.add_argument(
        "--models", nargs="+", action="extend", default=[], metavar="GLOB",
        help="model names or profile ids the key may use (globs, e.g. 'qwen*'); default: all",
    )  # fmt: skip
    create.add_argument(
        "--apis", default="", metavar="LIST",
        help=f"comma-separated dialects the key may use ({','.join(DIALECTS)}); default: all",
    )  # fmt: skip
    create.add_argument("--rate", type=int, metavar="N", help="at most N requests per minute")
    create.add_argument(
        "--expires",
        metavar="DATE",
        help="YYYY-MM-DD (the key stops working that day, local time) or an ISO datetime",
    )
    create.set_defaults(handler=_create)

    listing = actions.add_parser(
        "list", parents=[common], help="names, scopes, created, last used; never secrets"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)

    revoke = actions.add_parser("revoke", parents=[common], help="delete a key; it stops working at once")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_revoke)

    rotate = actions.add_parser("rotate", parents=[common], help="a new secret for a key, same scopes")
    rotate.add_argument("name")
    rotate.set_defaults(handler=_rotate)


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _store(args: argparse.Namespace) -> KeyStore:
    if args.service:
        return KeyStore(args.service)
    try:
        return KeyStore(load_profile(args.profile).profile.auth.keyring_service)
    except ProfileError as exc:
        for problem in exc.problems:
            _err(str(problem))
        _err("the profile is invalid; fix it (or pass --service) so the keys go to the right keyring service")
        raise SystemExit(1) from None


def parse_expiry(text: str) -> float:
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day).timestamp()  # local midnight
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise KeyStoreError(f"--expires {text!r}: expected YYYY-MM-DD or an ISO 8601 date and time") from None
    return moment.timestamp()


def _run(args: argparse.Namespace, action) -> int:
    try:
        return action(_store(args))
    except KeyStoreUnavailable as exc:
        _err(f"error: API keys are unavailable: {exc}")
        return 1
    except KeyStoreError as exc:
        _err(f"error: {exc}")
        return 1


def _create(args: argparse.Namespace) -> int:
    def action(store: KeyStore) -> int:
        expires = parse_expiry(args.expires) if args.expires else None
        apis = [a for a in args.apis.split(",") if a.strip()]
        secret = store.create(args.name, args.models, apis, args.rate, expires)
        record = store.get(args.name)
        _err(f"created key {args.name!r} ({_scope(record)})" if record else f"created key {args.name!r}")
        _err("copy it now; it is stored only as a digest and cannot be shown again:")
        print(secret, flush=True)
        _notify(args)
        return 0

    return _run(args, action)


def _rotate(args: argparse.Namespace) -> int:
    def action(store: KeyStore) -> int:
        secret = store.rotate(args.name)
        _err(f"new secret for key {args.name!r}; the old one stops working now. Copy it now:")
        print(secret, flush=True)
        _notify(args)
        return 0

    return _run(args, action)


def _revoke(args: argparse.Namespace) -> int:
    def action(store: KeyStore) -> int:
        store.revoke(args.name)
        _err(f"revoked key {args.name!r}")
        _notify(args)
        return 0

    return _run(args, action)


def _list(args: argparse.Namespace) -> int:
    def action(store: KeyStore) -> int:
        records = store.list()
        last_used = _daemon_last_used(args)
        if args.json:
            rows = [{**r.public(), "last_used": last_used.get(r.name)} for r in records]
            print(json.dumps(rows, indent=2))
            return 0
        if not records:
            _err(
                f"no keys in keyring service {store.service!r}; create one with `mlx-serve keys create NAME`"
            )
            return 0
        print(
            f"{'NAME':20} {'MODELS':20} {'APIS':26} {'RATE/MIN':>8} {'CREATED':16} {'EXPIRES':16} LAST USED"
        )
        for r in records:
            print(
                f"{r.name:20} {','.join(r.models) or '*':20} {','.join(r.apis) or '*':26} "
                f"{r.rate_per_min or '-':>8} {_when(r.created):16} {_when(r.expires):16} {_when(last_used.get(r.name))}"
            )
        return 0

    return _run(args, action)


def _scope(record: KeyRecord) -> str:
    parts = [
        f"models: {', '.join(record.models) or 'all'}",
        f"apis: {', '.join(record.apis) or 'all'}",
        f"rate: {record.rate_per_min}/min" if record.rate_per_min else "rate: unlimited",
        f"expires: {_when(record.expires)}" if record.expires else "expires: never",
    ]
    return "; ".join(parts)


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "-"


def _daemon_call(args: argparse.Namespace, path: str, method: str) -> tuple[int, Any] | None:
    request = urllib.request.Request(daemon_url(args) + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=40) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _notify(args: argparse.Namespace) -> None:
    answer = _daemon_call(args, "/keys/refresh", "POST")
    url = daemon_url(args)
    if answer is None:
        _err(f"no daemon answers at {url}; it loads the keys when it starts")
    elif answer[0] == 200:
        _err(f"the daemon at {url} has the change ({answer[1].get('keys')} keys)")
    elif answer[0] == 503:
        _err(f"warning: the daemon at {url} cannot read the keyring: {answer[1].get('error')}")
    else:
        _err(
            f"warning: the daemon at {url} did not take the change (HTTP {answer[0]}); run `mlx-serve reload`"
        )


def _daemon_last_used(args: argparse.Namespace) -> dict[str, float]:
    answer = _daemon_call(args, "/keys/status", "GET")
    if answer is None or answer[0] != 200 or not isinstance(answer[1].get("last_used"), dict):
        return {}
    return answer[1]["last_used"]
