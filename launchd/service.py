"""`mlx-serve service ...` operations on launchd (macOS) or a systemd --user unit (Linux).

Each operation is a short list of Steps: write or remove the service file, and manager commands,
some conditional on the manager's current view ("if loaded" / "if running"). The same list is
either executed (querying the manager once, first) or, with --dry-run, printed without running
anything. Command sequences:

launchd  install   print; bootout + wait (if loaded); enable; bootstrap   (reinstall = restart)
         uninstall print; bootout (if loaded); rm plist
         start     print; kickstart (if loaded) | enable + bootstrap (if not)
         stop      print; bootout (if loaded)   (the plist stays: it starts again at next login)
         restart   print; kickstart -k (if loaded) | enable + bootstrap (if not)
systemd  install   show; daemon-reload; enable --now; restart (if running)
         uninstall show; disable --now (if loaded); rm unit; daemon-reload
         start|stop|restart   start|stop|restart
"""

from __future__ import annotations

import http.client
import json
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import launchctl as lc
from .launchctl import ManagerStatus, ServiceError
from .plist import LABEL, Installed, ServiceSpec, plist_bytes, plist_path, read_installed_plist
from .systemd import UNIT_NAME, read_installed_unit, render_unit, unit_path

MANAGERS = ("launchd", "systemd")


def default_manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...] = ()
    when: str | None = None  # "loaded" | "not loaded" | "running": condition on the queried status
    write: bytes | None = None
    remove: bool = False
    path: Path | None = None
    wait_gone: float = 0.0  # after bootout: poll until launchd has forgotten the job

    def applies(self, status: ManagerStatus | None) -> bool:
        if self.when is None or status is None:
            return True
        if self.when == "not loaded":
            return not status.loaded
        return bool(getattr(status, self.when))

    def describe(self) -> str:
        note = f"   # only if {self.when}" if self.when else ""
        if self.write is not None:
            return f"write {self.path}{note}"
        if self.remove:
            return f"rm -f {shlex.quote(str(self.path))}{note}"
        if self.wait_gone:
            return f"(wait up to {self.wait_gone:.0f}s until launchd has unloaded the job){note}"
        return shlex.join(self.argv) + note


class Launchd:
    name = "launchd"

    def __init__(self) -> None:
        self.label = LABEL
        self.path = plist_path()

    def render(self, spec: ServiceSpec) -> bytes:
        return plist_bytes(spec)

    def query_cmd(self) -> list[str]:
        return lc.print_cmd(self.label)

    def query(self) -> ManagerStatus:
        return lc.launchd_status(self.label)

    def installed(self) -> Installed | None:
        return read_installed_plist(self.path)

    def _load(self, when: str | None = None) -> list[Step]:
        return [
            Step(tuple(lc.enable_cmd(self.label)), when=when),
            Step(tuple(lc.bootstrap_cmd(str(self.path))), when=when),
        ]

    def install_steps(self, content: bytes, stop_timeout: float) -> list[Step]:
        return [
            Step(write=content, path=self.path),
            Step(tuple(lc.bootout_cmd(self.label)), when="loaded"),
            Step(wait_gone=stop_timeout + 5, when="loaded"),
            *self._load(),
        ]

    def uninstall_steps(self) -> list[Step]:
        return [Step(tuple(lc.bootout_cmd(self.label)), when="loaded"), Step(remove=True, path=self.path)]

    def action_steps(self, action: str) -> list[Step]:
        if action == "stop":
            return [Step(tuple(lc.bootout_cmd(self.label)), when="loaded")]
        kick = lc.kickstart_cmd(self.label, kill=action == "restart")
        return [Step(tuple(kick), when="loaded"), *self._load(when="not loaded")]

    def wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.query().loaded:
            if time.monotonic() > deadline:
                raise ServiceError(f"launchd still has {self.label} loaded {timeout:.0f}s after bootout")
            time.sleep(0.2)


class Systemd:
    name = "systemd"

    def __init__(self) -> None:
        self.unit = UNIT_NAME
        self.path = unit_path()

    def render(self, spec: ServiceSpec) -> bytes:
        return render_unit(spec).encode()

    def query_cmd(self) -> list[str]:
        return lc.show_cmd(self.unit)

    def query(self) -> ManagerStatus:
        return lc.systemd_status(self.unit)

    def installed(self) -> Installed | None:
        return read_installed_unit(self.path)

    def install_steps(self, content: bytes, stop_timeout: float) -> list[Step]:
        return [
            Step(write=content, path=self.path),
            Step(tuple(lc.systemctl_cmd("daemon-reload"))),
            Step(tuple(lc.systemctl_cmd("enable", "--now", self.unit))),
            Step(tuple(lc.systemctl_cmd("restart", self.unit)), when="running"),
        ]

    def uninstall_steps(self) -> list[Step]:
        return [
            Step(tuple(lc.systemctl_cmd("disable", "--now", self.unit)), when="loaded"),
            Step(remove=True, path=self.path),
            Step(tuple(lc.systemctl_cmd("daemon-reload"))),
        ]

    def action_steps(self, action: str) -> list[Step]:
        return [Step(tuple(lc.systemctl_cmd(action, self.unit)))]


def get_manager(name: str | None) -> Launchd | Systemd:
    name = name or default_manager()
    if name not in MANAGERS:
        raise ServiceError(f"unknown service manager {name!r} (choose {' or '.join(MANAGERS)})")
    return Launchd() if name == "launchd" else Systemd()


def execute(
    manager: Launchd | Systemd, steps: list[Step], *, dry_run: bool = False, out: TextIO = sys.stdout
) -> None:
    """Run the steps (querying the manager first if any step is conditional), or print them."""
    conditional = any(step.when for step in steps)
    if dry_run:
        if conditional:
            print(shlex.join(manager.query_cmd()) + "   # current state", file=out)
        for step in steps:
            print(step.describe(), file=out)
        return
    status = manager.query() if conditional else None
    for step in steps:
        if not step.applies(status):
            continue
        if step.write is not None and step.path is not None:
            step.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = step.path.with_name(step.path.name + ".tmp")
            tmp.write_bytes(step.write)
            tmp.replace(step.path)
        elif step.remove and step.path is not None:
            step.path.unlink(missing_ok=True)
        elif step.wait_gone and isinstance(manager, Launchd):
            manager.wait_gone(step.wait_gone)
        elif step.argv:
            lc.run(step.argv)


def install(
    manager: Launchd | Systemd, spec: ServiceSpec, *, dry_run: bool = False, out: TextIO = sys.stdout
) -> None:
    content = manager.render(spec)
    steps = manager.install_steps(content, spec.stop_timeout)
    if dry_run:
        print(f"# {manager.path}", file=out)
        print(content.decode().rstrip("\n"), file=out)
        print("# commands", file=out)
    else:
        spec.stdout_path.parent.mkdir(parents=True, exist_ok=True)  # launchd will not create it
    execute(manager, steps, dry_run=dry_run, out=out)


# ---- the daemon's own view --------------------------------------------------------------------
@dataclass(frozen=True)
class HealthProbe:
    url: str
    reachable: bool
    ours: bool
    body: dict[str, Any] | None = None
    error: str | None = None


def probe_url(host: str, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_our_health(body: Any) -> bool:
    return isinstance(body, dict) and body.get("status") == "ok" and "version" in body and "profile" in body


def probe_health(host: str, port: int, *, timeout: float = 3.0, path: str = "/health") -> HealthProbe:
    """GET /health: reachable at all? and is it an mlx-serve daemon answering with our JSON?"""
    url = probe_url(host, port)
    try:
        with urllib.request.urlopen(url + path, timeout=timeout) as resp:
            raw = resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        raw = exc.read(1 << 20)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        refused = isinstance(reason, ConnectionRefusedError)
        return HealthProbe(url, reachable=not refused, ours=False, error=str(reason))
    try:
        body = json.loads(raw)
    except ValueError:
        return HealthProbe(url, reachable=True, ours=False, error="answered, but not with JSON")
    ours = is_our_health(body) if path == "/health" else isinstance(body, dict)
    return HealthProbe(url, reachable=True, ours=ours, body=body if isinstance(body, dict) else None)


def status_lines(
    manager: Launchd | Systemd, address: Callable[[], tuple[str, int]]
) -> tuple[bool, list[str]]:
    """`service status`: the manager's view plus /health; returns (healthy, lines)."""
    lines = [f"manager:   {manager.name} ({manager.path})"]
    installed = manager.installed()
    lines.append(f"installed: {'yes' if installed else 'no'}")
    view = manager.query()
    lines.append(f"state:     {view.state}")
    lines.append(f"pid:       {view.pid or '-'}")
    lines.append(f"last exit: {view.last_exit or '-'}")
    host, port = address()
    probe = probe_health(host, port)
    if probe.ours and probe.body:
        lines.append(f"health:    ok at {probe.url} (mlx-serve {probe.body.get('version')})")
    else:
        lines.append(f"health:    no mlx-serve daemon at {probe.url} ({probe.error or 'not our JSON'})")
    return bool(installed and view.running and probe.ours), lines


def daemon_address(profile: Path | str | None) -> tuple[str, int]:
    """Where the daemon listens for this profile; an invalid profile falls back to the defaults,
    exactly as the daemon does when it starts on one."""
    from mlx_serve.profiles.loader import ProfileError, load_profile
    from mlx_serve.profiles.schema import Server

    try:
        server = load_profile(profile).profile.server
    except ProfileError:
        server = Server()
    return server.host, server.port
