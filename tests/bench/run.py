"""Benchmark mlx-serve against its peers and the raw engines, side by side in one run.

    python tests/bench/run.py [--smoke] [--only a,b] [--runs N] [--out DIR] [--threads N]

Prints a ratio table (mlx-serve / peer server, mlx-serve / raw engine, on medians of --runs runs
with min-max shown), checks issue 10's and issue 11's targets, and writes results.json, chart.png and the
servers' logs to DIR (default tests/bench/results/<timestamp>/). --smoke is a seconds-long version
that only proves the harness works (CI); its numbers mean nothing. Exit status 1 when a workload
failed to produce its figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
import targets  # noqa: E402
import workloads_editor  # noqa: E402, F401  (registers issue 11's workloads)
import workloads_prefix  # noqa: E402, F401
import workloads_runtime  # noqa: E402, F401
from common import BENCH_DIR, Settings, build_models  # noqa: E402
from workloads import WORKLOADS, Bench  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = ", ".join(WORKLOADS)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long run proving the harness works")
    parser.add_argument("--only", "--workloads", dest="workloads", help=f"comma-separated subset of: {names}")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, smoke 1)")
    parser.add_argument("--out", type=Path, help="results folder (default tests/bench/results/<timestamp>)")
    parser.add_argument(
        "--threads", type=int, help="llama.cpp threads for every system (default: physical cores)"
    )
    args = parser.parse_args(argv)
    selected = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    unknown = [w for w in selected if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {names}")
    args.selected = selected
    return args


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH_DIR
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=BENCH_DIR
        )
        return (
            head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None
        )
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.make(args.smoke, args.runs, args.threads)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or BENCH_DIR / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    log(f"settings: {settings}")
    models = build_models()
    log(f"models: {models}")
    meta = {
        "timestamp": stamp,
        "argv": sys.argv[1:] if argv is None else argv,
        "settings": settings.__dict__,
        "models": {k: str(v) for k, v in models.__dict__.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
        },
        "versions": {d: _version(d) for d in ("mlx", "mlx-lm", "llama_cpp_python", "mlx-serve", "aiohttp")},
        "git": _git(),
        "failures": {},
    }
    bench = Bench(settings, models, out, log)
    try:
        for name in args.selected:
            fn, description = WORKLOADS[name]
            log(f"workload {name}: {description}")
            try:
                fn(bench)
            except Exception:
                meta["failures"][name] = traceback.format_exc()
                log(f"workload {name} FAILED:\n{traceback.format_exc()}")
    finally:
        bench.close()
    meta["machine"]["loadavg_end"] = os.getloadavg()
    meta["seconds"] = round(time.monotonic() - started, 1)

    figures = bench.figures.all()
    rows = report.rows(figures)
    target_list = targets.issue10(max(settings.concurrency), f"cpu over {settings.idle_window:g}s")
    target_list += targets.issue11(settings.prefill_tokens, settings.chat_streams)
    target_results = targets.check(rows, target_list)
    report.write_json(out / "results.json", meta, figures, rows, target_results)
    title = f"mlx-serve benchmark {stamp}{' (smoke)' if settings.smoke else ''}, {settings.runs} run(s) per figure"
    report.write_chart(out / "chart.png", figures, title)
    print()
    print(report.table(rows))
    print()
    print(targets.text(target_results))
    load = meta["machine"]
    print(f"\nload average {load['loadavg_start'][0]:.1f} at start, {load['loadavg_end'][0]:.1f} at end")
    print(f"results: {out}/results.json, {out}/chart.png (in {meta['seconds']}s)")
    for name in meta["failures"]:
        print(f"FAILED workload: {name}", file=sys.stderr)
    return 1 if meta["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
