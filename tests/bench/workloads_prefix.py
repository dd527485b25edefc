"""Issue 11, prefix caching: a 10-turn conversation and a long prefix shared by two requests.

Both run on mlx-serve (its profile defaults: prefix cache on) and the family's peer server, on the
real SmolLM2 with llama.cpp and the tiny model with MLX (SmolLM2's prefill on the MLX CPU backend
takes minutes, as in the prefill workload). Figures are TTFTs as a client sees them, plus
`cached_tokens` from the usage mlx-serve streams. The multi-turn workload also times the raw engine
reading each measured turn's new tokens after its cached history: the compute floor of that TTFT,
and of its growth over the conversation.
"""

from __future__ import annotations

import texts
from client import chat_body, run_streams
from common import StreamResult
from peers import MLX_SERVE
from workloads import Bench, record_failures, rotate, shown_seconds, workload

FAMILIES = ("llama.cpp smollm2", "mlx tiny")


def _conversation(
    url: str, model: str, run: int, turns: int, words: int, max_tokens: int
) -> list[StreamResult]:
    """One conversation: each turn sends the whole history, the model's replies included."""
    messages: list[dict] = []
    results = []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": texts.chat_turn(run, turn, words)})
        r = run_streams(url, [chat_body(model, list(messages), max_tokens)])[0][0]
        results.append(r)
        messages.append({"role": "assistant", "content": r.text})
    return results


@workload("multi_turn", "10-turn chat resending the history each turn: TTFT per turn, turn 10 vs turn 2")
def multi_turn(bench: Bench) -> None:
    s, f = bench.settings, bench.figures
    last = s.turns
    for key in FAMILIES:
        with bench.servers(bench.family(key)) as servers:
            for run in range(s.runs):
                for server in rotate(servers, run):
                    system = server.spec.name
                    results = _conversation(
                        server.url, server.spec.model_name, run, s.turns, s.turn_words, s.turn_max_tokens
                    )
                    ttfts = [r.ttft for r in results]
                    for turn in sorted({1, 2, last}):
                        r = results[turn - 1]
                        f.add("multi_turn", f"{key} turn {turn}", system, "ttft_s", r.ttft, ttfts=ttfts)
                        f.add("multi_turn", f"{key} turn {turn}", system, "prompt_tokens", r.prompt_tokens)
                        f.add("multi_turn", f"{key} turn {turn}", system, "cached_tokens", r.cached_tokens)
                    t2, tn = ttfts[1], ttfts[-1]
                    ratio = tn / t2 if tn is not None and t2 else None
                    f.add("multi_turn", key, system, "last_over_turn2", ratio, turns=last)
                    record_failures(bench, "multi_turn", key, system, results)
                    bench.log(
                        f"  multi_turn {key} run {run} {system}: ttft per turn [{shown_seconds(ttfts)}]"
                    )
                    if system == MLX_SERVE:
                        _compute_floor(bench, key, results, last)


def _compute_floor(bench: Bench, key: str, results: list[StreamResult], last: int) -> None:
    """The raw engine reading turn 2's and the last turn's new tokens after their cached history
    (the counts mlx-serve reported): what those TTFTs cost in model compute alone, so the ratio
    shows how much of the growth is the model's (attention over a longer context) and not the
    server's."""
    raw = bench.raw(bench.family(key))
    floor = {}
    for turn in (2, last):
        r = results[turn - 1]
        if r.prompt_tokens is None or r.cached_tokens is None:
            return
        floor[turn] = raw.prefill_after(r.cached_tokens, r.prompt_tokens - r.cached_tokens)
        bench.figures.add("multi_turn", f"{key} turn {turn}", raw.name, "ttft_s", floor[turn])
    bench.figures.add("multi_turn", key, raw.name, "last_over_turn2", floor[last] / floor[2], turns=last)
    bench.log(f"  multi_turn {key} {raw.name}: turn 2 {floor[2]:.3f} s, turn {last} {floor[last]:.3f} s")


@workload("shared_prefix", "two requests sharing a ~1500-token system prompt: second TTFT vs cold TTFT")
def shared_prefix(bench: Bench) -> None:
    s, f = bench.settings, bench.figures
    for key in FAMILIES:
        case = f"{key} ~{s.prefill_tokens} tok"
        with bench.servers(bench.family(key)) as servers:
            for run in range(s.runs):
                system_prompt = texts.shared_system_prompt(run + 1, s.prefill_tokens, bench.count_tokens)
                for server in rotate(servers, run):
                    system, model = server.spec.name, server.spec.model_name
                    results = []
                    for k in (1, 2):  # cold, then the same prefix with another question
                        messages = [
                            {"role": "system", "content": system_prompt},
                            {"role": "user", "content": texts.question(run, k)},
                        ]
                        results.append(run_streams(server.url, [chat_body(model, messages, 2)])[0][0])
                    cold, warm = results
                    f.add("shared_prefix", case, system, "ttft_cold_s", cold.ttft, cached=cold.cached_tokens)
                    f.add("shared_prefix", case, system, "ttft_warm_s", warm.ttft)
                    ratio = warm.ttft / cold.ttft if warm.ttft is not None and cold.ttft else None
                    f.add("shared_prefix", case, system, "warm_over_cold", ratio)
                    f.add("shared_prefix", case, system, "prompt_tokens", warm.prompt_tokens)
                    f.add("shared_prefix", case, system, "cached_tokens", warm.cached_tokens)
                    record_failures(bench, "shared_prefix", case, system, results)
                    bench.log(
                        f"  shared_prefix {case} {system}: cold {cold.ttft}, warm {warm.ttft} "
                        f"(cached {warm.cached_tokens} of {warm.prompt_tokens})"
                    )
