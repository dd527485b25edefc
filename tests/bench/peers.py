"""Server processes the harness measures: mlx-serve (the production CLI, a profile written here),
`llama_cpp.server` and `mlx_lm.server`, all started on the same model files with the same thread
count, stopped with SIGTERM (then SIGKILL), their logs kept next to the results.

Each server exposes its pid, so workloads can read its RSS and CPU time from /proc.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MLX_SERVE = "mlx-serve"
LLAMA_CPP_SERVER = "llama_cpp.server"
MLX_LM_SERVER = "mlx_lm.server"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOADED_AT_START = "model loaded at start"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _toml(value: Any) -> str:
    return json.dumps(value)  # strings, ints and bools only: JSON spells them as TOML does


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server on one model. `engine` is "llama_cpp" or "mlx" (mlx-serve's names)."""

    system: str
    engine: str
    model_path: Path
    threads: int
    max_concurrency: int = 1
    ttl: str = "forever"
    context_length: int = 4096
    # More `key = value` TOML lines for mlx-serve's model table (e.g. speculative settings), and
    # command-line arguments for a peer: how later workloads vary the configuration.
    profile_lines: tuple[str, ...] = ()
    peer_args: tuple[str, ...] = ()
    # The name figures are recorded under when one system runs in several configurations, e.g.
    # "mlx-serve (lookup off)"; empty = the system's name.
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.system

    @property
    def model_name(self) -> str:
        """The `model` field of requests (mlx_lm.server accepts only the path it was started with)."""
        return str(self.model_path) if self.system == MLX_LM_SERVER else "bench"

    @property
    def ready_path(self) -> str:
        return "/v1/models" if self.system == LLAMA_CPP_SERVER else "/health"

    @property
    def loads_at_start(self) -> bool:
        return self.system == LLAMA_CPP_SERVER


class Server:
    """One running server process. Use as a context manager, or start() / stop()."""

    def __init__(self, spec: ServerSpec, workdir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.profile_path: Path | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{spec.system}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _command(self) -> tuple[list[str], dict[str, str]]:
        spec, py = self.spec, sys.executable
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if spec.system == MLX_SERVE:
            home = self.workdir / f"home-{self.port}"
            home.mkdir(parents=True, exist_ok=True)
            self.profile_path = profile = home / "profile.toml"  # a reload workload may edit it
            profile.write_text(self.profile_text())
            env["MLX_SERVE_HOME"] = str(home)
            cmd = [py, "-m", "mlx_serve.daemon", "serve", "--profile", str(profile), "--port", str(self.port)]
            return cmd, env
        if spec.system == LLAMA_CPP_SERVER:
            cmd = [py, "-m", "llama_cpp.server", "--model", str(spec.model_path), "--port", str(self.port)]
            cmd += ["--host", "127.0.0.1", "--n_threads", str(spec.threads)]
            cmd += ["--n_threads_batch", str(spec.threads), "--n_ctx", str(spec.context_length)]
            return cmd + list(spec.peer_args), env
        if spec.system == MLX_LM_SERVER:
            cmd = [py, "-m", "mlx_lm", "server", "--model", str(spec.model_path), "--port", str(self.port)]
            return cmd + ["--host", "127.0.0.1", "--log-level", "WARNING", *spec.peer_args], env
        raise ValueError(spec.system)

    def profile_text(self) -> str:
        spec = self.spec
        lines = [
            "# written by tests/bench/peers.py",
            '[models."bench"]',
            f"source = {_toml(str(spec.model_path))}",
            f"engine = {_toml(spec.engine)}",
            f"ttl = {_toml(spec.ttl)}",
            f"max_concurrency = {spec.max_concurrency}",
            f"context_length = {spec.context_length}",
        ]
        if spec.engine == "llama_cpp":
            lines.append(f"threads = {spec.threads}")
        return "\n".join([*lines, *spec.profile_lines]) + "\n"

    def start(self, timeout: float = 120.0) -> Server:
        cmd, env = self._command()
        with open(self.log_path, "ab") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.system} exited with {self.proc.returncode}:\n{self.logs()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + self.spec.ready_path, timeout=2) as resp:
                    if resp.status == 200:
                        self.startup_seconds = time.perf_counter() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"{self.spec.system} not up after {timeout}s:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    # ---- /proc readings ------------------------------------------------------------------
    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """utime + stime of the process (all its threads), from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
