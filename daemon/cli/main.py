"""`mlx-serve` command line. Each command group lives in its own module; this file only wires them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlx_serve.daemon import __version__
from mlx_serve.daemon.cli.admin import add_admin_commands
from mlx_serve.daemon.cli.config import add_config_commands
from mlx_serve.daemon.cli.doctor import add_doctor_command
from mlx_serve.daemon.cli.keys import add_keys_commands
from mlx_serve.daemon.cli.models import add_models_commands
from mlx_serve.daemon.cli.monitoring import add_monitoring_commands
from mlx_serve.daemon.cli.serve import add_serve_command
from mlx_serve.daemon.cli.service import add_service_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-serve",
        description="Always-on local LLM daemon: one TOML profile, OpenAI / Anthropic / Ollama APIs.",
    )
    parser.add_argument("--version", action="version", version=f"mlx-serve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_command(commands)
    add_config_commands(commands)
    add_admin_commands(commands)
    add_service_commands(commands)
    add_doctor_command(commands)
    add_keys_commands(commands)
    add_monitoring_commands(commands)
    add_models_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
