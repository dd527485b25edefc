"""`mlx-serve config ...`: validate, show, diff, init."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tomlkit

from mlx_serve.profiles.diff import diff
from mlx_serve.profiles.loader import DEFAULT_PROFILE_PATH, LoadedProfile, ProfileError, load_profile
from mlx_serve.profiles.starter import starter_text


def add_config_commands(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="validate, show, compare and create profiles")
    sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)

    validate = sub.add_parser("validate", help="check a profile; exit 1 with one line per problem")
    validate.add_argument("path", nargs="?", help=f"profile (default {DEFAULT_PROFILE_PATH})")
    validate.set_defaults(handler=_validate)

    show = sub.add_parser("show", help="print the effective profile with defaults filled in")
    show.add_argument("path", nargs="?", help=f"profile (default {DEFAULT_PROFILE_PATH})")
    show.set_defaults(handler=_show)

    compare = sub.add_parser("diff", help="what applying NEW over OLD would change")
    compare.add_argument("old")
    compare.add_argument("new")
    compare.set_defaults(handler=_diff)

    init = sub.add_parser("init", help="write a commented starter profile (never overwrites)")
    init.add_argument("path", nargs="?", default=str(DEFAULT_PROFILE_PATH))
    init.set_defaults(handler=_init)


def _load_or_report(path: str | None) -> LoadedProfile | None:
    try:
        return load_profile(path)
    except ProfileError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.path)
    if loaded is None:
        return 1
    models = ", ".join(loaded.profile.models) or "no models"
    print(f"{loaded.path}: OK ({models})")
    return 0


def _show(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.path)
    if loaded is None:
        return 1
    print(f"# effective profile from {loaded.path}")
    print(tomlkit.dumps(loaded.profile.model_dump(mode="json", exclude_none=True)), end="")
    return 0


def _diff(args: argparse.Namespace) -> int:
    old, new = _load_or_report(args.old), _load_or_report(args.new)
    if old is None or new is None:
        return 1
    plan = diff(old.profile, new.profile)
    print(plan.summary())
    for change in plan.changed:
        kind = "reload" if change.needs_reload else "metadata"
        print(f"  {change.model_id}: {kind} ({', '.join(change.fields)})")
    return 0


def _init(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser()
    if path.exists():
        print(f"{path} already exists; not overwriting it", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_text())
    print(f"wrote {path}")
    return 0
