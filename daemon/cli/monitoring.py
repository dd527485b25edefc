"""`mlx-serve monitoring export DIR [--force] [--target HOST:PORT] [--profile PATH]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_serve.daemon.monitoring import ASSETS, ScrapeTarget, export, target_from_profile
from mlx_serve.profiles.loader import DEFAULT_PROFILE_PATH, ProfileError, load_profile


def add_monitoring_commands(commands: argparse._SubParsersAction) -> None:
    monitoring = commands.add_parser(
        "monitoring", help="Grafana dashboard, Prometheus scrape config and alert rules"
    )
    sub = monitoring.add_subparsers(dest="monitoring_command", metavar="SUBCOMMAND", required=True)
    export_cmd = sub.add_parser("export", help=f"write {', '.join(ASSETS)} into DIR")
    export_cmd.add_argument("directory", metavar="DIR")
    export_cmd.add_argument("--force", action="store_true", help="overwrite files that already exist")
    export_cmd.add_argument(
        "--target", help="scrape address HOST:PORT (default: the profile's metrics address)"
    )
    export_cmd.add_argument(
        "--profile", help=f"profile to read the address from (default {DEFAULT_PROFILE_PATH})"
    )
    export_cmd.set_defaults(handler=_export)


def _scrape_target(args: argparse.Namespace) -> ScrapeTarget:
    try:
        from_profile = target_from_profile(load_profile(args.profile).profile)
    except ProfileError as exc:
        if not args.target:
            print(f"note: cannot read the profile ({exc.problems[0]}); using defaults", file=sys.stderr)
        from_profile = ScrapeTarget()
    if args.target:
        return ScrapeTarget(args.target, from_profile.path)
    return from_profile


def _export(args: argparse.Namespace) -> int:
    directory = Path(args.directory).expanduser()
    try:
        paths = export(directory, force=args.force, scrape=_scrape_target(args))
    except FileExistsError as exc:
        print(f"not overwriting {exc} (use --force)", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    scrape = directory / "prometheus-scrape.yml"
    print(
        f"next: merge {scrape.name} into prometheus.yml, add rule_files: [alert-rules.yml], "
        "and import grafana-dashboard.json in Grafana (Dashboards > New > Import)"
    )
    return 0
