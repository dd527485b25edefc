"""`serve` re-executes itself on the C allocator (daemon/entry.py): in place, keeping its pid, and
leaving a PYTHONMALLOC the user set alone. Read from the running daemon's /proc environment,
which shows the environment of its last exec."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _exec_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.skipif("PYTHONMALLOC" in os.environ, reason="the test run sets its own PYTHONMALLOC")
def test_serve_runs_on_the_c_allocator_under_the_pid_it_was_started_with(start_daemon) -> None:
    daemon = start_daemon({})  # answering /health: the pid Popen started is the server
    assert _exec_environment(daemon.proc.pid).get("PYTHONMALLOC") == "malloc"


def test_a_pythonmalloc_the_user_set_is_kept(start_daemon) -> None:
    daemon = start_daemon({}, env={"PYTHONMALLOC": "pymalloc"})
    assert _exec_environment(daemon.proc.pid)["PYTHONMALLOC"] == "pymalloc"
