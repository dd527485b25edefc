"""Issue 11, mlx-serve against itself: prompt lookup on vs off, and profile reloads while streaming.

- prompt_lookup: two daemons on the real SmolLM2, one with `[models.X.speculative.prompt_lookup]`
  (the schema's defaults, adaptive gate included: min_acceptance 0.3) and one without, greedy.
  Code-edit echo (the model rewrites a function given in the prompt) should gain; novel text (a
  story) should lose nothing; both outputs must be byte-identical to lookup off. Figures: "mlx-serve"
  is lookup on, "mlx-serve (lookup off)" the baseline, so the table's "vs peer" is on / off.
- reloads: steady streaming with and without 20 profile edits (an alias changes: metadata, the
  model is unchanged and must not reload), on one daemon, phases taking turns. "mlx-serve" is the
  phase with reloads, "mlx-serve (no reloads)" the baseline. Reloads applied and model loads are
  read from /metrics.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack

import texts
from client import chat_body, keep_streaming, run_streams, session
from common import StreamResult
from peers import MLX_SERVE, Server
from workloads import Bench, record_failures, record_single, rotate, workload

LOOKUP_ON, LOOKUP_OFF = MLX_SERVE, f"{MLX_SERVE} (lookup off)"
WITH_RELOADS, NO_RELOADS = MLX_SERVE, f"{MLX_SERVE} (no reloads)"
LOOKUP_LINES = ('[models."bench".speculative.prompt_lookup]',)
RELOAD_STREAMS = 2


@workload("prompt_lookup", "code-edit echo and novel text, greedy, prompt lookup on vs off (real SmolLM2)")
def prompt_lookup(bench: Bench) -> None:
    s, f = bench.settings, bench.figures
    cases = [("llama.cpp smollm2", s.echo_max_tokens)]
    if s.mlx_real_max_tokens:  # SmolLM2 on the MLX CPU backend: ~6 tok/s, fewer tokens
        cases.append(("mlx smollm2", s.mlx_real_max_tokens))
    for key, max_tokens in cases:
        family = bench.family(key)
        # Prompt lookup turns llama.cpp's flash attention on (batched verification matches plain
        # decoding only with it): the lookup-off daemon uses it too, so both run the same kernels.
        same_kernels = ("flash_attn = true",) if key.startswith("llama.cpp") else ()
        with ExitStack() as stack:
            servers = [
                bench.start(
                    stack,
                    bench.spec(
                        family, MLX_SERVE, profile_lines=(*same_kernels, *LOOKUP_LINES), label=LOOKUP_ON
                    ),
                ),
                bench.start(
                    stack, bench.spec(family, MLX_SERVE, profile_lines=same_kernels, label=LOOKUP_OFF)
                ),
            ]
            for run in range(s.runs):
                for kind, prompt in (
                    ("code echo", texts.echo_prompt(run)),
                    ("novel text", texts.novel_prompt(run)),
                ):
                    case = f"{key} {kind}"
                    text: dict[str, str] = {}
                    for server in rotate(servers, run):
                        body = chat_body(server.spec.model_name, prompt, max_tokens)
                        r = run_streams(server.url, [body])[0][0]
                        record_single(bench, "prompt_lookup", case, server.spec.name, r)
                        text[server.spec.name] = r.text
                        bench.log(
                            f"  prompt_lookup {case} run {run} {server.spec.name}: {r.decode_tok_s or 0:.1f} tok/s"
                        )
                    same = text[LOOKUP_ON] == text[LOOKUP_OFF]
                    f.add(
                        "prompt_lookup", case, LOOKUP_ON, "identical", int(same), chars=len(text[LOOKUP_ON])
                    )


def _metric(server: Server, name: str, labels: str = "") -> float:
    """The sum of a metric's samples (those whose labels contain `labels`) on /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        body = resp.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.M)
    return sum(float(m.group(2)) for m in pattern.finditer(body) if labels in (m.group(1) or ""))


def _edit_profile(server: Server, k: int) -> None:
    """Save the profile with a new alias for the model, the way editors do (write, then rename)."""
    assert server.profile_path is not None
    edited = server.profile_text().replace(
        '[models."bench"]\n', f'[models."bench"]\naliases = ["bench-edit-{k}"]\n', 1
    )
    tmp = server.profile_path.with_name(".profile.toml.tmp")
    tmp.write_text(edited)
    os.replace(tmp, server.profile_path)


async def _steady(
    server: Server,
    make_body: Callable[[int, int], dict],
    seconds: float,
    edits: list[float],
    edit: Callable[[int], None],
) -> tuple[list[StreamResult], float]:
    """RELOAD_STREAMS clients streaming back to back for `seconds`, edit(k) at each time in
    `edits`; returns every request's result and the wall time until the last one ended."""
    async with session() as http:
        stop = asyncio.Event()
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(keep_streaming(http, server.url, lambda i, c=c: make_body(c, i), stop))
            for c in range(RELOAD_STREAMS)
        ]
        for k, at in enumerate(edits):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            edit(k)
        await asyncio.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
        stop.set()
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
        return results, time.perf_counter() - t0


@workload("reloads", "20 profile edits (metadata only) during steady streaming vs the same streaming without")
def reloads(bench: Bench) -> None:
    s, f = bench.settings, bench.figures
    key = "llama.cpp smollm2"
    case = f"{key} {RELOAD_STREAMS} streams"
    seconds = (s.reloads + 1) * s.reload_interval
    with bench.servers(bench.family(key), max_concurrency=RELOAD_STREAMS, peer=False) as (server,):
        for run in range(s.runs):
            for phase in rotate([WITH_RELOADS, NO_RELOADS], run):
                edits = (
                    [s.reload_interval * (k + 1) for k in range(s.reloads)] if phase == WITH_RELOADS else []
                )
                ok0 = _metric(server, "mlx_serve_config_reloads_total", 'result="success"')
                loads0 = _metric(server, "mlx_serve_model_loads_total")

                # Prompts differ between the phases: repeating the first phase's would hand the
                # second its prompts' KV from the prefix cache (measured: the second phase ran ~8% faster).
                stream0 = 0 if phase == WITH_RELOADS else RELOAD_STREAMS

                def body(
                    c: int, i: int, model: str = server.spec.model_name, run: int = run, c0: int = stream0
                ) -> dict:
                    return chat_body(model, texts.story(run * 50 + i, c0 + c), s.max_tokens)

                def edit(k: int, run: int = run) -> None:
                    _edit_profile(server, run * 100 + k)

                results, wall = asyncio.run(_steady(server, body, seconds, edits, edit))
                time.sleep(1.0)  # the last edit's reload lands in the counters
                tokens = sum(r.tokens for r in results)
                f.add(
                    "reloads", case, phase, "agg_tok_s", tokens / wall, tokens=tokens, requests=len(results)
                )
                record_failures(bench, "reloads", case, phase, results)
                applied = _metric(server, "mlx_serve_config_reloads_total", 'result="success"') - ok0
                loads = _metric(server, "mlx_serve_model_loads_total") - loads0
                if phase == WITH_RELOADS:
                    f.add("reloads", case, phase, "reloads_applied", applied, edits=len(edits))
                    f.add("reloads", case, phase, "model_loads", loads)
                bench.log(
                    f"  reloads {case} run {run} {phase}: {tokens / wall:.1f} tok/s, {len(results)} requests, "
                    f"{applied:g} reloads applied, {loads:g} model loads"
                )
