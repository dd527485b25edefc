"""The one wrapper through which every `launchctl` and `systemctl --user` call goes.

Command builders are pure (so `--dry-run` can print exactly what would run); `run` executes one
command, and the status readers parse `launchctl print` / `systemctl show`. launchd is only ever
driven with the modern verbs (`bootstrap`, `bootout`, `kickstart`, `print`, `enable`): the legacy
`load` returns 0 even when it fails (ARCHITECTURE.md "Verified facts").
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

LAUNCHCTL = "launchctl"
SYSTEMCTL = "systemctl"
SYSTEMD_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "ExecMainStatus", "UnitFileState")
_ACTIVE = {"active", "activating", "reloading"}


class ServiceError(Exception):
    """A service operation failed; the message says what to do."""


# ---- command builders (pure) ------------------------------------------------------------------
def domain() -> str:
    return f"gui/{os.getuid()}"


def service_target(label: str) -> str:
    return f"{domain()}/{label}"


def bootstrap_cmd(plist_path: str) -> list[str]:
    return [LAUNCHCTL, "bootstrap", domain(), plist_path]


def bootout_cmd(label: str) -> list[str]:
    return [LAUNCHCTL, "bootout", service_target(label)]


def enable_cmd(label: str) -> list[str]:
    """Clears a `launchctl disable` left by the user, which would make bootstrap fail."""
    return [LAUNCHCTL, "enable", service_target(label)]


def kickstart_cmd(label: str, *, kill: bool = True) -> list[str]:
    return [LAUNCHCTL, "kickstart", *(["-k"] if kill else []), service_target(label)]


def print_cmd(label: str) -> list[str]:
    return [LAUNCHCTL, "print", service_target(label)]


def systemctl_cmd(*args: str) -> list[str]:
    return [SYSTEMCTL, "--user", *args]


def show_cmd(unit: str) -> list[str]:
    return systemctl_cmd("show", unit, "--property=" + ",".join(SYSTEMD_PROPERTIES))


# ---- execution ----------------------------------------------------------------------------------
def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise ServiceError(f"`{argv[0]}` is not on PATH; use --manager to pick the service manager you have")
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(argv)}` did not finish in {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or "no output"
        raise ServiceError(f"`{shlex.join(argv)}` failed with exit code {proc.returncode}: {detail}")
    return proc


# ---- status -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManagerStatus:
    """The service manager's view: is the job known (loaded), running, its pid and last exit."""

    loaded: bool
    running: bool
    pid: int | None = None
    last_exit: str | None = None
    state: str = "unknown"
    details: dict[str, str] = field(default_factory=dict)


_TOP_LEVEL = re.compile(r"^\t([A-Za-z][\w ]*?) = (.*)$")


def parse_launchctl_print(text: str) -> dict[str, str]:
    """Top-level `key = value` lines of `launchctl print` (one tab deep; nested blocks skipped)."""
    return {m.group(1): m.group(2).strip() for m in map(_TOP_LEVEL.match, text.splitlines()) if m}


def launchd_status(label: str) -> ManagerStatus:
    proc = run(print_cmd(label), check=False)
    if proc.returncode != 0:  # 113: "Could not find service ... in domain for user gui: 501"
        return ManagerStatus(loaded=False, running=False, state="not loaded")
    info = parse_launchctl_print(proc.stdout)
    pid = info.get("pid")
    state = info.get("state", "unknown")
    last = info.get("last exit code") or info.get("last exit status")
    if "last terminating signal" in info:
        last = f"{last} ({info['last terminating signal']})" if last else info["last terminating signal"]
    return ManagerStatus(
        loaded=True,
        running=state == "running",
        pid=int(pid) if pid and pid.isdigit() else None,
        last_exit=last,
        state=state,
        details=info,
    )


def parse_systemctl_show(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def systemd_status(unit: str) -> ManagerStatus:
    proc = run(show_cmd(unit), check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise ServiceError(f"`systemctl --user show` failed: {detail} (is a systemd user session running?)")
    info = parse_systemctl_show(proc.stdout)
    active = info.get("ActiveState", "unknown")
    pid = info.get("MainPID", "0")
    return ManagerStatus(
        loaded=info.get("LoadState") == "loaded",
        running=active in _ACTIVE,
        pid=int(pid) if pid.isdigit() and int(pid) > 0 else None,
        last_exit=info.get("ExecMainStatus"),
        state=f"{active} ({info.get('SubState', '?')}), unit file {info.get('UnitFileState') or 'absent'}",
        details=info,
    )
