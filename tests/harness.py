"""A real mlx-serve daemon process for tests: started with the production CLI (`mlx-serve serve`,
the production AppRunner with handler cancellation), driven over loopback HTTP, stopped with
SIGTERM. Loaded by conftest.py as `mlx_serve_test_harness`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def profile_text(models: dict[str, dict[str, Any]], **sections: dict[str, Any]) -> str:
    """A profile TOML from plain dicts: profile_text({"tiny": {...}}, server={"port": 1}).

    Unless the caller sets [defaults], llama.cpp runs one thread per model: on these 2 shared cores
    two spin-waiting llama.cpp threads stall each other whenever another process is busy (0.5 s a
    token for the tiny model), while one thread is as fast for the test models and never stalls.
    """
    sections = {"defaults": {"threads": 1}, **sections}
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for model_id, values in models.items():
        lines.append(f'[models."{model_id}"]')
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


class Daemon:
    def __init__(
        self,
        profile: Path,
        home: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
        port_from_profile: bool = False,
    ) -> None:
        self.profile = profile
        self.home = home
        self.port = port or free_port()
        self.port_from_profile = port_from_profile  # no --port: the profile's [server] port applies
        self.log_path = home / "daemon.log"
        self.env = {**os.environ, "MLX_SERVE_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0, wait_ready: bool = False) -> Daemon:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "mlx_serve.daemon", "serve", "--profile", str(self.profile)]
        if not self.port_from_profile:
            cmd += ["--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout
        path = "/ready" if wait_ready else "/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"daemon not up after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
