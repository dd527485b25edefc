"""Turn figures into the ratio table (stdout), results.json and chart.png.

Ratios are always mlx-serve / other (medians): for "higher is better" metrics above 1 means
mlx-serve is ahead, for "lower is better" metrics (times, memory, CPU) below 1 does.
The issues' targets are checked from the same rows (targets.py).
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path
from typing import Any

from common import Figure
from peers import LOADED_AT_START, MLX_SERVE

# no ratios, not charted
COUNT_METRICS = {
    "incomplete", "errors", "tokens", "cached_tokens", "prompt_tokens", "identical", "reloads_applied",
    "model_loads",
}  # fmt: skip
TOTAL_METRICS = {"incomplete", "errors"}  # shown as totals over runs
# a system's ratio to itself (warm / cold, ...): charted, but a ratio of two of them means little
SELF_RATIO_METRICS = {"warm_over_cold", "last_over_turn2", "loaded_over_idle", "after_over_before"}


def role(system: str) -> str:
    if system == MLX_SERVE:
        return "mlx-serve"
    return "raw" if system.startswith("raw ") else "peer"


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"


def _label(fig: Figure) -> str:
    loaded = any(state == LOADED_AT_START for state in fig.extra.get("state", ()))
    return f"{fig.system} (model loaded)" if loaded else fig.system


def cell(fig: Figure | None, name: bool = True) -> str:
    if fig is None:
        return ""
    label = f"{_label(fig)} " if name else ""
    if not fig.samples:
        return f"{label}-"
    if fig.metric in TOTAL_METRICS:
        return f"{label}{int(sum(fig.samples))} total"
    text = f"{label}{fmt(fig.median)}"
    if len(fig.samples) > 1:
        text += f" [{fmt(min(fig.samples))}-{fmt(max(fig.samples))}]"
    return text


def ratio(a: Figure | None, b: Figure | None) -> float | None:
    if a is None or b is None or a.median is None or not b.median:
        return None
    return a.median / b.median


def rows(figures: list[Figure]) -> list[dict[str, Any]]:
    """One row per (workload, case, metric, peer) with the mlx-serve, peer and raw figures and the
    ratios; a case with several peers (idle, startup) or raw engines (llama.cpp's split and
    unified KV) gets one row per peer or raw engine, the main raw engine in the first row."""
    groups: dict[tuple[str, str, str], list[Figure]] = {}
    for fig in figures:
        groups.setdefault((fig.workload, fig.case, fig.metric), []).append(fig)
    out = []
    for (workload, case, metric), figs in groups.items():
        ours = next((f for f in figs if role(f.system) == "mlx-serve"), None)
        raws = sorted((f for f in figs if role(f.system) == "raw"), key=lambda f: "(" in f.system)
        peers = [f for f in figs if role(f.system) == "peer"]
        counts = metric in COUNT_METRICS or metric in SELF_RATIO_METRICS
        for peer, row_raw in zip_longest(peers or [None], raws):
            out.append(
                {
                    "workload": workload,
                    "case": case,
                    "metric": metric,
                    "unit": figs[0].unit,
                    "higher_is_better": figs[0].higher_is_better,
                    "mlx_serve": ours.to_json() if ours else None,
                    "peer": peer.to_json() if peer else None,
                    "raw": row_raw.to_json() if row_raw else None,
                    "vs_peer": None if counts else ratio(ours, peer),
                    "vs_raw": None if counts else ratio(ours, row_raw),
                    "_cells": [cell(ours, name=False), cell(peer), cell(row_raw)],
                }
            )
    return out


def table(table_rows: list[dict[str, Any]]) -> str:
    header = ["workload", "case", "metric", "mlx-serve", "peer", "raw engine", "vs peer", "vs raw"]
    body = []
    for r in table_rows:
        arrow = "^" if r["higher_is_better"] else "v"
        metric = f"{r['metric']} ({r['unit']}{arrow})"
        ratios = [f"{x:.2f}x" if x is not None else "-" for x in (r["vs_peer"], r["vs_raw"])]
        body.append([r["workload"], r["case"], metric, *r["_cells"], *ratios])
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    legend = (
        "ratios are mlx-serve / other on medians; ^ higher is better, v lower is better; "
        "[min-max] over runs; incomplete = streams cut short, errors = failed streams, totals over runs"
    )
    return "\n".join([*lines, "", legend])


# ---- files ----------------------------------------------------------------------------------
def write_json(
    path: Path, meta: dict[str, Any], figures: list[Figure], table_rows: list, target_results: list
) -> None:
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in table_rows]
    data = {
        "meta": meta,
        "figures": [f.to_json() for f in figures],
        "table": clean,
        "targets": target_results,
    }
    path.write_text(json.dumps(data, indent=2, default=str))


SYSTEM_COLORS = {
    "mlx-serve": "tab:blue",
    "llama_cpp.server": "tab:orange",
    "mlx_lm.server": "tab:red",
    "raw llama.cpp": "tab:green",
    "raw mlx-lm": "tab:olive",
    "raw llama.cpp (unified KV)": "tab:cyan",
    "mlx-serve (lookup off)": "tab:purple",
    "mlx-serve (no reloads)": "tab:purple",
}
ROLE_ORDER = {"mlx-serve": 0, "peer": 1, "raw": 2}


def write_chart(path: Path, figures: list[Figure], title: str) -> None:
    """One panel per (workload, metric); per case, one bar per system (median, min-max whiskers).
    Panels whose values span more than 20x use a log scale (SmolLM2 vs tiny-model numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[Figure]] = {}
    for fig in figures:
        if fig.metric not in COUNT_METRICS and fig.samples:
            panels.setdefault((fig.workload, fig.metric), []).append(fig)
    cols = 3
    nrows = max(1, -(-len(panels) // cols))
    canvas, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.8 * nrows), squeeze=False)
    for ax, ((workload, metric), figs) in zip(axes.flat, panels.items(), strict=False):
        cases = list(dict.fromkeys(f.case for f in figs))
        seen: set[str] = set()
        for i, case in enumerate(cases):
            here = sorted(
                (f for f in figs if f.case == case), key=lambda f: (ROLE_ORDER[role(f.system)], f.system)
            )
            width = 0.8 / len(here)
            for k, f in enumerate(here):
                med = f.median or 0.0
                err = [[med - min(f.samples)], [max(f.samples) - med]]
                label = None if f.system in seen else _label(f)
                seen.add(f.system)
                x = i - 0.4 + width * (k + 0.5)
                ax.bar(
                    x,
                    med,
                    width,
                    yerr=err,
                    capsize=3,
                    color=SYSTEM_COLORS.get(f.system, "tab:gray"),
                    label=label,
                )
        values = [v for f in figs for v in f.samples if v > 0]
        if values and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=7)
        arrow = "higher is better" if figs[0].higher_is_better else "lower is better"
        ax.set_title(f"{workload}: {metric} ({figs[0].unit}, {arrow})", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    canvas.suptitle(title, fontsize=11)
    canvas.tight_layout(rect=(0, 0, 1, 0.97))
    canvas.savefig(path, dpi=90)
    plt.close(canvas)
