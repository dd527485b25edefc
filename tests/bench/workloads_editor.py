"""Issue 11, the editor: fill-in-the-middle sessions on an idle daemon and beside running chats.

FIM needs a model with FIM tokens: SmolLM2 with three specials renamed (fim_model.py, real
SmolLM2 compute) on llama.cpp, the tiny random FIM model on MLX (a GGUF source mlx-serve converts on
load). Requests are OpenAI /v1/completions with `suffix` (mlx-serve and llama_cpp.server both
build the FIM prompt from the model's tokens); mlx_lm.server has no FIM, so the MLX family has no
peer, and fim_under_load runs mlx-serve alone (see there). Every request sends the whole ~1500-token file around the cursor, as editors do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import texts
from client import chat_body, completion_body, keep_streaming, session, stream_chat
from common import StreamResult
from workloads import Bench, median_or_none, record_failures, rotate, shown_seconds, workload

FAMILIES = ("llama.cpp smollm2-fim", "mlx tiny-fim")
START_TIMEOUT = 300.0  # seconds for the chat streams to begin before FIM is measured anyway


def _fim_bodies(bench: Bench, model: str, seed: int, edits: int) -> list[dict]:
    s = bench.settings
    text = texts.code_file(seed, s.prefill_tokens, bench.count_tokens)
    return [
        completion_body(model, e.prefix, s.fim_max_tokens, suffix=e.suffix)
        for e in texts.fim_session(text, edits, seed)
    ]


async def _session(
    url: str, fims: list[dict], chats: int, chat_body_of: Callable[[int, int], dict] | None
) -> tuple[list[StreamResult], list[StreamResult]]:
    """The FIM requests one after another, while `chats` clients stream chat completions back to
    back (started first; FIM begins once each has delivered its first token). Returns (FIM results,
    chat results)."""
    async with session() as http:
        stop = asyncio.Event()
        started = [asyncio.Event() for _ in range(chats)]
        tasks = [
            asyncio.create_task(
                keep_streaming(http, url, lambda i, c=c: chat_body_of(c, i), stop, started[c].set)
            )
            for c in range(chats)
        ]
        if tasks:
            waiting = asyncio.gather(*(e.wait() for e in started))
            try:
                await asyncio.wait_for(waiting, START_TIMEOUT)
            except TimeoutError:
                pass  # measured anyway; the chats' errors are recorded
        results = [await stream_chat(http, url, body) for body in fims]
        stop.set()
        chat_results = [r for rs in await asyncio.gather(*tasks) for r in rs]
    return results, chat_results


def _warm(results: list[StreamResult]) -> float | None:
    """Median TTFT of the requests after the first (the file is known by then), else the first's."""
    rest = [r.ttft for r in results[1:]]
    return median_or_none(rest) if rest else results[0].ttft


@workload("fim_session", "editor FIM session on a ~1500-token file, cursor moving: TTFT per request")
def fim_session(bench: Bench) -> None:
    s, f = bench.settings, bench.figures
    for key in FAMILIES:
        with bench.servers(bench.family(key)) as servers:
            for run in range(s.runs):
                for server in rotate(servers, run):
                    system = server.spec.name
                    bodies = _fim_bodies(bench, server.spec.model_name, run + 1, s.fim_edits)
                    results, _ = asyncio.run(_session(server.url, bodies, 0, None))
                    cold, warm = results[0].ttft, _warm(results)
                    ttfts = [r.ttft for r in results]
                    f.add("fim_session", key, system, "ttft_cold_s", cold, ttfts=ttfts)
                    f.add("fim_session", key, system, "ttft_warm_s", warm)
                    f.add(
                        "fim_session", key, system, "warm_over_cold", warm / cold if warm and cold else None
                    )
                    f.add("fim_session", key, system, "prompt_tokens", results[-1].prompt_tokens)
                    f.add(
                        "fim_session",
                        key,
                        system,
                        "cached_tokens",
                        median_or_none([r.cached_tokens for r in results[1:]]),
                    )
                    record_failures(bench, "fim_session", key, system, results)
                    bench.log(
                        f"  fim_session {key} run {run} {system}: ttft per request [{shown_seconds(ttfts)}]"
                    )


@workload("fim_under_load", "FIM TTFT while 4 chat streams run on the same model vs on an idle daemon")
def fim_under_load(bench: Bench) -> None:
    s, f = bench.settings, bench.figures
    n, edits = s.chat_streams, max(2, s.fim_edits // 2)
    loaded_case = f"{n} chats running"
    for key in FAMILIES:
        # mlx-serve only: llama_cpp.server serves one request at a time and a new one interrupts the
        # running one, so back-to-back chats there just cut each other short (and take minutes)
        with bench.servers(bench.family(key), max_concurrency=n + 1, peer=False) as servers:
            for run in range(s.runs):
                for server in rotate(servers, run):
                    system, model = server.spec.name, server.spec.model_name

                    def chat(c: int, i: int, model: str = model, run: int = run) -> dict:
                        return chat_body(model, texts.story(run * 10 + i, c), s.max_tokens)

                    warm: dict[str, float | None] = {}
                    for phase, chats in rotate([("idle", 0), (loaded_case, n)], run):
                        seed = 100 + run * 2 + (chats > 0)  # a new file per phase: no warm start
                        bodies = _fim_bodies(bench, model, seed, edits)
                        results, chat_results = asyncio.run(_session(server.url, bodies, chats, chat))
                        warm[phase] = _warm(results)
                        case = f"{key} {phase}"
                        f.add(
                            "fim_under_load",
                            case,
                            system,
                            "ttft_warm_s",
                            warm[phase],
                            ttfts=[r.ttft for r in results],
                        )
                        f.add("fim_under_load", case, system, "ttft_cold_s", results[0].ttft)
                        record_failures(bench, "fim_under_load", case, system, results + chat_results)
                    idle, loaded = warm["idle"], warm[loaded_case]
                    ratio = loaded / idle if loaded is not None and idle else None
                    f.add("fim_under_load", key, system, "loaded_over_idle", ratio)
                    bench.log(f"  fim_under_load {key} run {run} {system}: idle {idle}, loaded {loaded}")
