"""The issues' targets, checked on the ratio table's medians: PASS, FAIL, or n/a (not measured).

A target reads one table row, found by (workload, case, metric): its "vs raw" / "vs peer" ratio, or
mlx-serve's own figure (median; for counts, the worst run). Where mlx-serve is compared with itself
(prompt lookup on/off, with/without reloads) the baseline sits in the peer column, so "vs peer" is
the target's ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from report import COUNT_METRICS, fmt

Index = dict[tuple[str, str, str], dict[str, Any]]
Outcome = tuple[bool, str] | None


@dataclass(frozen=True)
class Target:
    issue: int
    text: str
    check: Callable[[Index], Outcome]


def ratio(workload: str, case: str, metric: str, against: str, at_least: float) -> Callable[[Index], Outcome]:
    def check(index: Index) -> Outcome:
        row = index.get((workload, case, metric))
        value = row and row[f"vs_{against}"]
        return None if value is None else (value >= at_least, f"{value:.3f}x")

    return check


def no_more_than_raw(workload: str, case: str, metric: str, slack: float) -> Callable[[Index], Outcome]:
    """mlx-serve's median within `slack` times the raw engine's (for self-ratios, which have no
    "vs raw" column)."""

    def check(index: Index) -> Outcome:
        row = index.get((workload, case, metric))
        ours, raw = (row and row["mlx_serve"]), (row and row["raw"])
        if not ours or not raw or ours["median"] is None or not raw["median"]:
            return None
        return ours["median"] <= slack * raw["median"], f"{ours['median']:.2f} vs raw {raw['median']:.2f}"

    return check


def value(
    workload: str, case: str, metric: str, at_most: float | None = None, at_least: float | None = None
) -> Callable[[Index], Outcome]:
    """mlx-serve's median (counts: the worst run) within the bound(s)."""

    def check(index: Index) -> Outcome:
        row = index.get((workload, case, metric))
        fig = row and row["mlx_serve"]
        if not fig or fig["median"] is None:
            return None
        worst = metric in COUNT_METRICS
        high = fig["max"] if worst else fig["median"]
        low = fig["min"] if worst else fig["median"]
        ok = (at_most is None or high <= at_most) and (at_least is None or low >= at_least)
        return ok, fmt(high if at_most is not None else low)

    return check


def issue10(max_level: int, idle_case: str) -> list[Target]:
    top = f"c={max_level}"
    out = [
        Target(10, f"decode {fam}: >= 0.95x raw", ratio("decode", fam, "tok_s", "raw", 0.95))
        for fam in ("llama.cpp smollm2", "mlx smollm2", "mlx tiny")
    ]
    for fam, peer_min in (("llama.cpp smollm2", 2.0), ("mlx tiny", 1.0)):
        case = f"{fam} {top}"
        raw = (
            "raw batch-" + str(max_level) + (" (split KV, as the engine)" if fam.startswith("llama") else "")
        )
        out += [
            Target(10, f"{case} aggregate: >= 0.9x {raw}", ratio("concurrency", case, "agg_tok_s", "raw", 0.9)),
            Target(10, f"{case} aggregate: >= {peer_min:g}x peer", ratio("concurrency", case, "agg_tok_s", "peer", peer_min)),
            Target(10, f"{case}: no stream cut short", value("concurrency", case, "incomplete", at_most=0)),
            Target(10, f"{case}: no stream errored", value("concurrency", case, "errors", at_most=0)),
        ]  # fmt: skip
    out += [
        Target(10, f"idle CPU ({idle_case}) < 0.5%", value("idle", idle_case, "cpu_pct", at_most=0.5)),
        Target(10, "startup to /health < 2 s", value("startup", "to ready", "startup_s", at_most=2.0)),
    ]
    for fam in ("llama.cpp smollm2", "mlx smollm2"):
        text = f"{fam}: RSS after TTL within 15% of pre-load"
        out.append(Target(10, text, value("ttl_release", fam, "after_over_before", at_most=1.15)))
    return out


def issue11(prefix_tokens: int, chat_streams: int) -> list[Target]:
    out = []
    for fam in ("llama.cpp smollm2", "mlx tiny"):
        case = f"{fam} ~{prefix_tokens} tok"
        out += [
            Target(11, f"shared prefix {case}: 2nd request TTFT <= 0.2x cold", value("shared_prefix", case, "warm_over_cold", at_most=0.2)),
            Target(11, f"shared prefix {case}: cached_tokens reported", value("shared_prefix", case, "cached_tokens", at_least=1)),
            Target(11, f"multi-turn {fam}: last turn TTFT <= 1.5x turn 2", value("multi_turn", fam, "last_over_turn2", at_most=1.5)),
            Target(11, f"multi-turn {fam}: TTFT grows no more than the raw engine's compute (not in the issue)", no_more_than_raw("multi_turn", fam, "last_over_turn2", slack=1.05)),
        ]  # fmt: skip
    for fam in ("llama.cpp smollm2", "mlx smollm2"):
        echo, novel = f"{fam} code echo", f"{fam} novel text"
        out += [
            Target(11, f"{echo}: lookup on >= 1.5x tok/s of off", ratio("prompt_lookup", echo, "tok_s", "peer", 1.5)),
            Target(11, f"{echo}: output byte-identical to lookup off (every run)", value("prompt_lookup", echo, "identical", at_least=1)),
            Target(11, f"{novel}: lookup on >= 0.95x tok/s of off", ratio("prompt_lookup", novel, "tok_s", "peer", 0.95)),
        ]  # fmt: skip
    for fam in ("llama.cpp smollm2-fim", "mlx tiny-fim"):
        out += [
            Target(11, f"FIM {fam}: TTFT with {chat_streams} chats running <= 2x idle", value("fim_under_load", fam, "loaded_over_idle", at_most=2.0)),
            Target(11, f"FIM session {fam}: warm TTFT <= 0.2x cold (the shared-prefix bar; not in the issue)", value("fim_session", fam, "warm_over_cold", at_most=0.2)),
        ]  # fmt: skip
    case = "llama.cpp smollm2 2 streams"  # workloads_runtime.RELOAD_STREAMS
    out += [
        Target(11, f"reloads {case}: no failed request", value("reloads", case, "errors", at_most=0)),
        Target(11, f"reloads {case}: no stream cut short", value("reloads", case, "incomplete", at_most=0)),
        Target(11, f"reloads {case}: throughput >= 0.95x without reloads", ratio("reloads", case, "agg_tok_s", "peer", 0.95)),
        Target(11, f"reloads {case}: the unchanged model never reloaded", value("reloads", case, "model_loads", at_most=0)),
    ]  # fmt: skip
    return out


def check(table_rows: list[dict[str, Any]], targets: list[Target]) -> list[dict[str, Any]]:
    index: Index = {}
    for r in table_rows:  # a case with several peers or raws has several rows: the first is the main one
        index.setdefault((r["workload"], r["case"], r["metric"]), r)
    results = []
    for target in targets:
        outcome = target.check(index)
        status = "n/a" if outcome is None else ("PASS" if outcome[0] else "FAIL")
        results.append(
            {
                "issue": target.issue,
                "target": target.text,
                "status": status,
                "value": outcome[1] if outcome else None,
            }
        )
    return results


def text(results: list[dict[str, Any]]) -> str:
    out = []
    for issue in dict.fromkeys(r["issue"] for r in results):
        out.append(f"issue {issue} targets:")
        out += [
            f"  {r['status']:4}  {r['target']}  ({r['value'] or 'not measured'})"
            for r in results
            if r["issue"] == issue
        ]
    return "\n".join(out)
