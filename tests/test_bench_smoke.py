"""The benchmark harness (tests/bench/run.py) works end to end: its smoke mode starts mlx-serve and
the peer servers, runs every workload once with tiny settings, and writes the results and chart.
Its numbers are not checked (the machine is shared); that every workload produced them is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent / "bench" / "run.py"

pytest.importorskip("matplotlib", reason="the bench extra is not installed (pip install -e '.[bench]')")
pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's server extra is not installed")


@pytest.mark.slow
def test_smoke_run_writes_a_number_for_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert (out / "chart.png").stat().st_size > 10_000
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["failures"] == {}

    workloads = {"decode", "concurrency", "prefill", "startup", "idle", "ttl_release"}
    measured = {f["workload"] for f in data["figures"] if f["median"] is not None}
    assert measured == workloads

    def median(workload: str, system: str, metric: str) -> list[float]:
        return [
            f["median"]
            for f in data["figures"]
            if (f["workload"], f["system"], f["metric"]) == (workload, system, metric)
            and f["median"] is not None
        ]

    # Every system produced its figures, and every stream it served delivered tokens.
    for system in ("mlx-serve", "llama_cpp.server", "mlx_lm.server", "raw llama.cpp", "raw mlx-lm"):
        assert all(v > 0 for v in median("decode", system, "tok_s")) and median("decode", system, "tok_s"), (
            system
        )
        assert median("prefill", system, "ttft_s"), system
        assert median("concurrency", system, "agg_tok_s"), system
    for system in ("mlx-serve", "llama_cpp.server", "mlx_lm.server"):
        assert median("startup", system, "startup_s"), system
        assert median("idle", system, "rss_mb"), system
        assert median("idle", system, "cpu_pct"), system
    # The ratio table pairs mlx-serve with its peers and the raw engines.
    rows = [r for r in data["table"] if r["workload"] == "decode" and r["metric"] == "tok_s"]
    assert rows and all(r["vs_peer"] and r["vs_raw"] for r in rows)
    assert "vs raw" in proc.stdout and "issue 10 targets" in proc.stdout
