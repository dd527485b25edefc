"""`mlx-serve serve`: run the daemon in the foreground (launchd / systemd supervise it)."""

from __future__ import annotations

import argparse
import logging
import os


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--profile", help="profile path (default ~/.mlx-serve/config.toml, else the embedded default)"
    )
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--log-level", default=os.environ.get("MLX_SERVE_LOG_LEVEL", "info"))
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from mlx_serve.daemon.server import run  # imported lazily: `mlx-serve config ...` stays fast

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from mlx_serve.apis.redact import install_redaction
    from mlx_serve.launchd.logrotate import setup_file_logging

    install_redaction()  # the home directory shows as ~ in every log line (the file log copies it)
    setup_file_logging()  # $MLX_SERVE_HOME/logs/mlx-serve.log, size-rotated
    install_redaction()
    return run(args.profile, host=args.host, port=args.port)
