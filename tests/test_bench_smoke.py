"""The benchmark harness (tests/bench/run.py) works end to end: its smoke mode starts mlx-serve and
the peer servers, runs every workload (issue 10's and issue 11's) once with tiny settings, and writes
the results and chart.
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
        timeout=1800,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert (out / "chart.png").stat().st_size > 10_000
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["failures"] == {}

    workloads = {"decode", "concurrency", "prefill", "startup", "idle", "ttl_release"}
    workloads |= {"multi_turn", "shared_prefix", "fim_session", "fim_under_load", "prompt_lookup", "reloads"}
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
    # llama.cpp's batch baseline: split KV like the engine, the unified cache as an extra row.
    assert median("concurrency", "raw llama.cpp (unified KV)", "agg_tok_s")
    # Issue 11: every workload measured what its targets need, and no request failed.
    for workload, system, metric in (
        ("multi_turn", "mlx-serve", "last_over_turn2"),
        ("multi_turn", "llama_cpp.server", "last_over_turn2"),
        ("shared_prefix", "mlx-serve", "warm_over_cold"),
        ("shared_prefix", "mlx-serve", "cached_tokens"),
        ("fim_session", "mlx-serve", "warm_over_cold"),
        ("fim_session", "llama_cpp.server", "ttft_cold_s"),
        ("fim_under_load", "mlx-serve", "loaded_over_idle"),
        ("prompt_lookup", "mlx-serve", "tok_s"),
        ("prompt_lookup", "mlx-serve (lookup off)", "tok_s"),
        ("prompt_lookup", "mlx-serve", "identical"),
        ("reloads", "mlx-serve", "agg_tok_s"),
        ("reloads", "mlx-serve (no reloads)", "agg_tok_s"),
        ("reloads", "mlx-serve", "reloads_applied"),
    ):
        assert median(workload, system, metric), (workload, system, metric)
    issue11 = {"multi_turn", "shared_prefix", "fim_session", "fim_under_load", "prompt_lookup", "reloads"}
    errors = [
        (f["workload"], f["case"], f["system"])
        for f in data["figures"]
        if f["workload"] in issue11 and f["metric"] == "errors" and any(f["samples"])
    ]
    assert errors == []
    # The ratio table pairs mlx-serve with its peers and the raw engines.
    rows = [r for r in data["table"] if r["workload"] == "decode" and r["metric"] == "tok_s"]
    assert rows and all(r["vs_peer"] and r["vs_raw"] for r in rows)
    assert "vs raw" in proc.stdout and "issue 10 targets" in proc.stdout and "issue 11 targets" in proc.stdout
    statuses = {t["status"] for t in data["targets"] if t["issue"] == 11}
    assert statuses <= {"PASS", "FAIL", "n/a"} and statuses - {"n/a"}
