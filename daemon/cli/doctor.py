"""`mlx-serve doctor [--profile PATH] [--port N]`: one line per check, a fix under each problem.

Exit status: 0 when nothing FAILs (warnings are fine), 1 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_serve.daemon.cli.checks import Check, Context, run_checks
from mlx_serve.launchd.service import MANAGERS
from mlx_serve.profiles.loader import DEFAULT_PROFILE_PATH


def add_doctor_command(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser("doctor", help="check the installation, profile, port, keyring and service")
    doctor.add_argument(
        "--profile", help=f"profile to check (default {DEFAULT_PROFILE_PATH}, else the embedded one)"
    )
    doctor.add_argument("--port", type=int, help="port to check instead of the profile's server.port")
    doctor.add_argument(
        "--manager", choices=MANAGERS, help="service manager to ask (default: the platform's)"
    )
    doctor.set_defaults(handler=_doctor)


def format_check(check: Check) -> list[str]:
    lines = [f"{check.status:<5} {check.name:<8} {check.message}"]
    lines += [f"{'':<15}{detail}" for detail in check.details]
    if check.fix and check.status in ("WARN", "FAIL"):
        lines.append(f"{'':<15}fix: {check.fix}")
    return lines


def _doctor(args: argparse.Namespace) -> int:
    ctx = Context(
        profile_path=Path(args.profile).expanduser() if args.profile else None,
        port=args.port,
        manager=args.manager,
    )
    checks = run_checks(ctx)
    for check in checks:
        print("\n".join(format_check(check)), flush=True)
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "WARN" for c in checks)
    print(f"\n{failed} problem(s), {warned} warning(s)" if failed or warned else "\nall checks passed")
    return 1 if failed else 0
