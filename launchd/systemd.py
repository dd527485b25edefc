"""The systemd --user unit for Linux: the same ServiceSpec as the LaunchAgent, as `mlx-serve.service`.

`Restart=on-failure` mirrors launchd's `KeepAlive = {SuccessfulExit = false}`; `TimeoutStopSec`
mirrors `ExitTimeOut` (drain budget + 10 s); stdout/stderr are appended to the same log files.
The unit lives in `$XDG_CONFIG_HOME/systemd/user/` (default `~/.config/systemd/user/`). It starts
at login; to keep it running without a login session, `loginctl enable-linger $USER`.
"""

from __future__ import annotations

import os
import re
import shlex
from importlib import resources
from pathlib import Path
from string import Template

from .plist import THROTTLE_INTERVAL, Installed, ServiceSpec

UNIT_NAME = "mlx-serve.service"
TEMPLATE = "mlx-serve.service"
_SAFE = re.compile(r"^[A-Za-z0-9_./:=@+,-]+$")


def unit_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT_NAME


def _specifiers(value: str) -> str:
    """systemd expands %x specifiers in most settings; a literal % is %%."""
    return value.replace("%", "%%")


def quote_arg(arg: str) -> str:
    """One ExecStart word: % and $ escaped (both are expanded there), quoted when needed."""
    escaped = _specifiers(arg).replace("$", "$$")
    if _SAFE.match(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def environment_lines(env: dict[str, str]) -> str:
    lines = []
    for key, value in env.items():
        pair = _specifiers(f"{key}={value}").replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'Environment="{pair}"')
    return "\n".join(lines)


def render_unit(spec: ServiceSpec) -> str:
    text = resources.files("mlx_serve.launchd").joinpath("templates", TEMPLATE).read_text()
    return Template(text).substitute(
        exec_start=" ".join(quote_arg(a) for a in spec.program),
        working_directory=_specifiers(str(spec.working_directory)),
        environment=environment_lines(spec.environment),
        restart_sec=THROTTLE_INTERVAL,
        timeout_stop_sec=spec.stop_timeout,
        stdout_path=_specifiers(str(spec.stdout_path)),
        stderr_path=_specifiers(str(spec.stderr_path)),
    )


def read_installed_unit(path: Path | None = None) -> Installed | None:
    path = path or unit_path()
    try:
        text = path.read_text()
    except OSError:
        return None
    program = profile = env_home = stop = None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            args = [a.replace("%%", "%").replace("$$", "$") for a in shlex.split(value)]
            program = args[0] if args else None
            if "--profile" in args[:-1]:
                profile = Path(args[args.index("--profile") + 1])
        elif key == "Environment":
            pair = shlex.split(value)[0].replace("%%", "%") if value.strip() else ""
            if pair.startswith("MLX_SERVE_HOME="):
                env_home = Path(pair.partition("=")[2])
        elif key == "TimeoutStopSec" and value.strip().isdigit():
            stop = float(value)
    return Installed(path=path, program=program, profile=profile, home=env_home, stop_timeout=stop)
