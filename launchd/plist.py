"""The LaunchAgent: what the service runs (ServiceSpec, shared with the systemd unit) and the plist.

Label: `dev.mlx-serve.daemon` (reverse-DNS of the project name plus the role; the file is
`~/Library/LaunchAgents/dev.mlx-serve.daemon.plist`, the launchd target
`gui/$UID/dev.mlx-serve.daemon`). The fixed policy (RunAtLoad, KeepAlive = {SuccessfulExit =
false}, ThrottleInterval, ProcessType = Interactive) lives in `templates/launchagent.plist`; this
module fills in the absolute paths, the environment and ExitTimeOut.

Every path is absolute: launchd has no shell, no working directory and a bare PATH. The interpreter
is `sys.executable` of the installed environment, not resolved through symlinks (resolving a venv's
`bin/python` would leave the venv).
"""

from __future__ import annotations

import os
import plistlib
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mlx_serve.engines.sources.paths import home

from .launchctl import ServiceError
from .logrotate import STDERR_NAME, STDOUT_NAME

LABEL = "dev.mlx-serve.daemon"
TEMPLATE = "launchagent.plist"
THROTTLE_INTERVAL = 10
STOP_MARGIN = 10  # seconds the supervisor waits beyond the daemon's own drain budget
SYSTEM_PATH = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
HOMEBREW_PATH = ("/opt/homebrew/bin", "/usr/local/bin")
# Where models live: the daemon must see the same Hugging Face cache as the user's shell. Secrets
# (HF_TOKEN) are never copied into the service file; the hub library reads its own token file.
PASSTHROUGH_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE")
REQUIRED_KEYS = (
    "Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "ThrottleInterval", "ExitTimeOut",
    "ProcessType", "WorkingDirectory", "EnvironmentVariables", "StandardOutPath", "StandardErrorPath",
)  # fmt: skip


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a service manager needs to run the daemon, as absolute paths."""

    program: tuple[str, ...]
    profile: Path
    working_directory: Path
    stdout_path: Path
    stderr_path: Path
    drain_timeout: float
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def stop_timeout(self) -> int:
        """ExitTimeOut / TimeoutStopSec: always above the daemon's drain budget."""
        return int(self.drain_timeout) + STOP_MARGIN


def interpreter() -> str:
    return os.path.abspath(sys.executable)


def service_path_env(*, homebrew: bool) -> str:
    dirs = [str(Path(interpreter()).parent), *(HOMEBREW_PATH if homebrew else ()), *SYSTEM_PATH]
    return ":".join(dict.fromkeys(dirs))


def build_spec(
    profile: Path | str,
    drain_timeout: float,
    *,
    extra_env: dict[str, str] | None = None,
    homebrew: bool = True,
    must_exist: bool = True,
) -> ServiceSpec:
    profile_path = Path(profile).expanduser().absolute()
    if must_exist and not profile_path.is_file():
        raise ServiceError(
            f"profile {profile_path} does not exist: create it with `mlx-serve config init` or pass --profile"
        )
    base = home().expanduser().absolute()
    env = {"PATH": service_path_env(homebrew=homebrew), "MLX_SERVE_HOME": str(base), "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)})
    env.update(extra_env or {})
    logs = base / "logs"
    return ServiceSpec(
        program=(interpreter(), "-m", "mlx_serve.daemon", "serve", "--profile", str(profile_path)),
        profile=profile_path,
        working_directory=base,
        stdout_path=logs / STDOUT_NAME,
        stderr_path=logs / STDERR_NAME,
        drain_timeout=drain_timeout,
        environment=env,
    )


def template() -> dict[str, Any]:
    with resources.files("mlx_serve.launchd").joinpath("templates", TEMPLATE).open("rb") as fh:
        return plistlib.load(fh)


def render_plist(spec: ServiceSpec) -> dict[str, Any]:
    plist = template()
    plist.update(
        {
            "Label": LABEL,
            "ProgramArguments": list(spec.program),
            "ThrottleInterval": THROTTLE_INTERVAL,
            "ExitTimeOut": spec.stop_timeout,
            "WorkingDirectory": str(spec.working_directory),
            "EnvironmentVariables": dict(spec.environment),
            "StandardOutPath": str(spec.stdout_path),
            "StandardErrorPath": str(spec.stderr_path),
        }
    )
    missing = [key for key in REQUIRED_KEYS if key not in plist]
    if missing:  # a broken template is a packaging bug; fail loudly rather than install it
        raise ServiceError(f"LaunchAgent template lacks {', '.join(missing)}")
    return plist


def plist_bytes(spec: ServiceSpec) -> bytes:
    return plistlib.dumps(render_plist(spec), fmt=plistlib.FMT_XML, sort_keys=False)


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


@dataclass(frozen=True)
class Installed:
    """What an installed service file says (for status, logs and doctor)."""

    path: Path
    program: str | None
    profile: Path | None
    home: Path | None
    stop_timeout: float | None


def read_installed_plist(path: Path | None = None) -> Installed | None:
    path = path or plist_path()
    try:
        with open(path, "rb") as fh:
            data = plistlib.load(fh)
    except (OSError, plistlib.InvalidFileException, ValueError):
        return None
    args = data.get("ProgramArguments") or []
    profile = args[args.index("--profile") + 1] if "--profile" in args[:-1] else None
    env_home = (data.get("EnvironmentVariables") or {}).get("MLX_SERVE_HOME")
    return Installed(
        path=path,
        program=args[0] if args else None,
        profile=Path(profile) if profile else None,
        home=Path(env_home) if env_home else None,
        stop_timeout=data.get("ExitTimeOut"),
    )
