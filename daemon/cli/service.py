"""`mlx-serve service install|uninstall|start|stop|restart|status|logs`.

launchd LaunchAgent on macOS, systemd --user unit on Linux (`--manager` picks either on any OS).
The logic lives in mlx_serve.launchd; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from mlx_serve.engines.sources.paths import home
from mlx_serve.launchd import service as svc
from mlx_serve.launchd.launchctl import ServiceError
from mlx_serve.launchd.logrotate import LOG_NAME, STDERR_NAME, STDOUT_NAME
from mlx_serve.launchd.plist import LABEL, build_spec
from mlx_serve.profiles.loader import DEFAULT_PROFILE_PATH, ProfileError, load_profile
from mlx_serve.profiles.schema import Server
from mlx_serve.profiles.starter import starter_text

Handler = Callable[[argparse.Namespace], int]


def add_service_commands(commands: argparse._SubParsersAction) -> None:
    service = commands.add_parser(
        "service",
        help="start the daemon at login (launchd on macOS, systemd --user on Linux)",
        description=f"Manage the mlx-serve service (launchd label {LABEL}, systemd unit mlx-serve.service).",
    )
    sub = service.add_subparsers(dest="service_command", metavar="SUBCOMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--manager", choices=svc.MANAGERS, help=f"service manager (default here: {svc.default_manager()})"
    )
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true", help="print the file and the commands; run nothing")

    install = sub.add_parser("install", parents=[common, dry], help="write the service file and start it")
    install.add_argument("--profile", help=f"profile the service serves (default {DEFAULT_PROFILE_PATH})")
    install.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable (repeatable)",
    )
    install.set_defaults(handler=_guard(_install))
    uninstall = sub.add_parser(
        "uninstall", parents=[common, dry], help="stop the service and remove its file"
    )
    uninstall.set_defaults(handler=_guard(_uninstall))
    for action, text in (
        ("start", "start it"),
        ("stop", "stop it (until next login)"),
        ("restart", "restart it"),
    ):
        parser = sub.add_parser(action, parents=[common, dry], help=text)
        parser.set_defaults(handler=_guard(_action), action=action)
    status = sub.add_parser(
        "status", parents=[common], help="manager state, PID, last exit, /health (exit 3 if down)"
    )
    status.set_defaults(handler=_guard(_status))
    logs = sub.add_parser("logs", parents=[common], help="show the daemon's log files")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following (tail -F)")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines per file (default 50)")
    logs.set_defaults(handler=_guard(_logs))


def _guard(handler: Handler) -> Handler:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ServiceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapped


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ServiceError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _starter_profile(path: Path, dry_run: bool) -> None:
    """A service needs a file to serve (and the user one to edit): `serve` runs the embedded
    default when there is none, so the service gets the starter profile, which serves the same
    model, written where the daemon looks by default."""
    if dry_run:
        print(f"# would write the starter profile to {path} (there is none yet)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_text())
    print(f"no profile at {path}: wrote the starter profile there (SmolLM2, like the embedded default)")
    print("edit it any time: the service applies saved changes live")


def _install(args: argparse.Namespace) -> int:
    manager = svc.get_manager(args.manager)
    profile = Path(args.profile).expanduser() if args.profile else DEFAULT_PROFILE_PATH
    if not args.profile and not profile.exists():
        _starter_profile(profile, args.dry_run)
    drain = Server().drain_timeout
    if profile.is_file():
        try:  # the service's environment, not this shell's, applies: read the file without env overrides
            drain = load_profile(profile, apply_env=False).profile.server.drain_timeout
        except ProfileError as exc:
            print(
                "warning: the profile has problems; the daemon starts anyway and applies it once fixed:",
                file=sys.stderr,
            )
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
    spec = build_spec(
        profile,
        drain,
        extra_env=_parse_env(args.env),
        homebrew=manager.name == "launchd",
        must_exist=not args.dry_run or bool(args.profile),
    )
    svc.install(manager, spec, dry_run=args.dry_run)
    if args.dry_run:
        print("# dry run: nothing was written and no command was run")
    else:
        print(f"installed {manager.path} and started it with {manager.name}")
        print(f"logs: {spec.stdout_path.parent}  (mlx-serve service logs -f)")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    manager = svc.get_manager(args.manager)
    existed = manager.path.exists()
    svc.execute(manager, manager.uninstall_steps(), dry_run=args.dry_run)
    if not args.dry_run:
        print(
            f"removed {manager.path}"
            if existed
            else f"{manager.path} was not installed; nothing left to remove"
        )
    return 0


def _action(args: argparse.Namespace) -> int:
    manager = svc.get_manager(args.manager)
    if not manager.path.exists() and not args.dry_run:
        if args.action == "stop":
            print(f"not installed ({manager.path} does not exist); nothing to stop")
            return 0
        raise ServiceError(f"not installed ({manager.path} does not exist): run `mlx-serve service install`")
    svc.execute(manager, manager.action_steps(args.action), dry_run=args.dry_run)
    if not args.dry_run:
        print(f"{args.action}: done ({manager.name})")
    return 0


def _status(args: argparse.Namespace) -> int:
    manager = svc.get_manager(args.manager)
    installed = manager.installed()
    profile = installed.profile if installed else None
    healthy, lines = svc.status_lines(manager, lambda: svc.daemon_address(profile))
    if profile:
        lines.insert(2, f"profile:   {profile}")
    print("\n".join(lines))
    return 0 if healthy else 3


def _logs(args: argparse.Namespace) -> int:
    manager = svc.get_manager(args.manager)
    installed = manager.installed()
    directory = (installed.home if installed and installed.home else home()) / "logs"
    files = [directory / name for name in (LOG_NAME, STDERR_NAME, STDOUT_NAME)]
    present = [f for f in files if f.exists()]
    if not present and not args.follow:
        print(f"no log files yet in {directory}", file=sys.stderr)
        return 1
    cmd = ["tail", "-n", str(max(args.lines, 0))]
    if args.follow:
        cmd.append("-F")  # follows across rotation (rename for mlx-serve.log, truncate for the others)
    cmd += [str(f) for f in (files if args.follow else present)]
    return subprocess.call(cmd)
