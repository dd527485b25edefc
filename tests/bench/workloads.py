"""The workloads. Each is a function `(Bench) -> None` registered with @workload, recording samples
into bench.figures; run.py runs the selected ones in registry order.

Fairness rules every workload follows:
- every system gets the same model file, thread count, prompt text and max_tokens in a run;
- the systems take turns within each run (the order rotates run by run), so drift in the machine's
  load spreads over all of them instead of landing on one;
- prompts differ from run to run from their first user token on, so no prefix cache (mlx-serve's,
  llama.cpp's, mlx_lm.server's) turns a later run into a warm one;
- every server is warmed up (model loaded, one short generation) before it is measured.

To add a workload: write a function that takes the Bench, use bench.family()/bench.servers()/
bench.raw() and bench.figures.add(), decorate it. Issue 11's workloads live in their own modules
(workloads_prefix.py, workloads_editor.py, workloads_runtime.py), registered when run.py imports them.
"""

from __future__ import annotations

import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client import chat_body, run_streams
from common import Figure, Models, Settings, StreamResult
from peers import LLAMA_CPP_SERVER, LOADED_AT_START, MLX_LM_SERVER, MLX_SERVE, Server, ServerSpec
from raw_engines import LlamaRaw, MlxRaw, RawEngine
from texts import long_prompt, story

# metric -> (unit, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "tok_s": ("tok/s", True),
    "agg_tok_s": ("tok/s", True),
    "ttft_s": ("s", False),
    "ttft_median_s": ("s", False),
    "ttft_max_s": ("s", False),
    "prefill_tok_s": ("tok/s", True),
    "tokens": ("tok", True),
    "incomplete": ("streams", False),
    "errors": ("streams", False),
    "rss_mb": ("MiB", False),
    "cpu_pct": ("%", False),
    "startup_s": ("s", False),
    "rss_before_mb": ("MiB", False),
    "rss_loaded_mb": ("MiB", False),
    "rss_after_mb": ("MiB", False),
    "after_over_before": ("x", False),
    # issue 11
    "ttft_cold_s": ("s", False),
    "ttft_warm_s": ("s", False),
    "warm_over_cold": ("x", False),
    "last_over_turn2": ("x", False),
    "cached_tokens": ("tok", True),
    "prompt_tokens": ("tok", True),
    "identical": ("runs", True),
    "loaded_over_idle": ("x", False),
    "reloads_applied": ("reloads", True),
    "model_loads": ("loads", False),
}


@dataclass(frozen=True)
class Family:
    """One engine on one model file: mlx-serve's engine name, the peer server, the raw engine."""

    key: str
    engine: str  # mlx-serve's engine: "llama_cpp" or "mlx"
    model: Path
    peer: str | None  # None: no peer server runs this model file (mlx_lm.server reads no GGUF)


class Figures:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str, str, str], Figure] = {}

    def add(
        self, workload: str, case: str, system: str, metric: str, value: float | None, **extra: Any
    ) -> None:
        key = (workload, case, system, metric)
        if key not in self.items:
            unit, higher = METRICS[metric]
            self.items[key] = Figure(workload, case, system, metric, unit, higher)
        fig = self.items[key]
        if value is not None:
            fig.samples.append(float(value))
        for k, v in extra.items():
            fig.extra.setdefault(k, []).append(v)

    def all(self) -> list[Figure]:
        return list(self.items.values())


class Bench:
    """What a workload sees: settings, model files, servers, raw engines and the figures sink."""

    def __init__(self, settings: Settings, models: Models, workdir: Path, log: Callable[[str], None]) -> None:
        self.settings, self.models, self.workdir, self.log = settings, models, workdir, log
        self.figures = Figures()
        self._raw: dict[str, RawEngine] = {}
        self.families = {
            "llama.cpp smollm2": Family(
                "llama.cpp smollm2", "llama_cpp", models.smollm2_gguf, LLAMA_CPP_SERVER
            ),
            "mlx smollm2": Family("mlx smollm2", "mlx", models.smollm2_mlx, MLX_LM_SERVER),
            "mlx tiny": Family("mlx tiny", "mlx", models.tiny_mlx, MLX_LM_SERVER),
            # editor workloads: models with FIM tokens (the MLX one is a GGUF source, converted on load)
            "llama.cpp smollm2-fim": Family(
                "llama.cpp smollm2-fim", "llama_cpp", models.smollm2_fim_gguf, LLAMA_CPP_SERVER
            ),
            "mlx tiny-fim": Family("mlx tiny-fim", "mlx", models.tiny_fim_gguf, None),
        }

    def family(self, key: str) -> Family:
        return self.families[key]

    def spec(self, family: Family, system: str, **kw: Any) -> ServerSpec:
        return ServerSpec(system, family.engine, family.model, self.settings.threads, **kw)

    def raw(self, family: Family, kv_unified: bool = False) -> RawEngine:
        """The family's engine in-process; llama.cpp's with a split KV cache and flash attention as
        mlx-serve's engine has them, unless kv_unified (the unified-KV unified cache (ARCHITECTURE.md "Verified facts"), an extra row)."""
        key = f"{family.key}{' unified' if kv_unified else ''}"
        if key not in self._raw:
            self.log(f"  loading {key} in-process")
            if family.engine == "llama_cpp":
                from mlx_serve.engines.llamacpp.load import flash_attention  # imports llama.cpp
                from mlx_serve.profiles.schema import ModelSpec

                fa = flash_attention(ModelSpec(source=str(family.model), engine="llama_cpp"))
                engine: RawEngine = LlamaRaw(
                    family.model, self.settings.threads, kv_unified=kv_unified, flash_attn=fa
                )
            else:
                engine = MlxRaw(family.model)
            engine.generate([engine.chat_tokens("Say hi.")], 2)  # warm-up, like the servers get
            self._raw[key] = engine
        return self._raw[key]

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as a chat message to SmolLM2 (every family here shares its tokenizer)."""
        return len(self.raw(self.family("llama.cpp smollm2")).chat_tokens(text))

    def start(self, stack: ExitStack, spec: ServerSpec) -> Server:
        """Start one server on `stack` and warm it up (model loaded, one short generation)."""
        server = stack.enter_context(Server(spec, self.workdir / "logs"))
        results, _ = run_streams(server.url, [chat_body(spec.model_name, "Say hi.", 2)])
        if results[0].error:
            raise RuntimeError(f"{spec.name} warm-up failed: {results[0].error}\n{server.logs()[-2000:]}")
        return server

    @contextmanager
    def servers(
        self, family: Family, max_concurrency: int = 1, peer: bool = True, **spec_kw: Any
    ) -> Iterator[list[Server]]:
        """mlx-serve and the family's peer (if it has one and `peer`), started, warmed up, and
        stopped afterwards. spec_kw: more ServerSpec fields (profile_lines, peer_args, label)."""
        with ExitStack() as stack:
            systems = [MLX_SERVE] + ([family.peer] if peer and family.peer else [])
            yield [
                self.start(stack, self.spec(family, system, max_concurrency=max_concurrency, **spec_kw))
                for system in systems
            ]

    def close(self) -> None:
        for engine in self._raw.values():
            engine.close()
        self._raw.clear()


Workload = Callable[[Bench], None]
WORKLOADS: dict[str, tuple[Workload, str]] = {}


def workload(name: str, description: str) -> Callable[[Workload], Workload]:
    def register(fn: Workload) -> Workload:
        WORKLOADS[name] = (fn, description)
        return fn

    return register


def rotate(items: Sequence[Any], run: int) -> list[Any]:
    k = run % len(items)
    return [*items[k:], *items[:k]]


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def record_failures(bench: Bench, name: str, case: str, system: str, results: Sequence[StreamResult]) -> None:
    """Streams that failed (errors) and streams cut short without an error (incomplete)."""
    errors = [r.error for r in results if r.error]
    bench.figures.add(name, case, system, "errors", len(errors), error=errors[0] if errors else None)
    bench.figures.add(name, case, system, "incomplete", sum(not r.complete and not r.error for r in results))


# ---- generation workloads -----------------------------------------------------------------
def record_single(bench: Bench, name: str, case: str, system: str, r: StreamResult) -> None:
    f = bench.figures
    f.add(name, case, system, "tok_s", r.decode_tok_s, counted_by=r.counted_by, finish=r.finish_reason)
    f.add(name, case, system, "ttft_s", r.ttft)
    f.add(name, case, system, "tokens", r.tokens)
    f.add(name, case, system, "incomplete", int(not r.complete and r.error is None))
    f.add(name, case, system, "errors", int(r.error is not None), error=r.error)


@workload("decode", "single-stream decode through streaming HTTP vs the raw engine's batch-1 loop")
def decode(bench: Bench) -> None:
    s = bench.settings
    cases = [("llama.cpp smollm2", s.max_tokens), ("mlx tiny", s.max_tokens)]
    if s.mlx_real_max_tokens:  # the MLX CPU backend runs SmolLM2 at ~6 tok/s: fewer tokens there
        cases.insert(1, ("mlx smollm2", s.mlx_real_max_tokens))
    for key, max_tokens in cases:
        family = bench.family(key)
        raw = bench.raw(family)
        with bench.servers(family) as servers:
            for run in range(s.runs):
                prompt = story(run, 0)
                for target in rotate([*servers, raw], run):
                    if isinstance(target, Server):
                        body = chat_body(target.spec.model_name, prompt, max_tokens)
                        r, system = run_streams(target.url, [body])[0][0], target.spec.system
                    else:
                        r, system = target.generate([target.chat_tokens(prompt)], max_tokens)[0], target.name
                    record_single(bench, "decode", key, system, r)
                    bench.log(
                        f"  decode {key} run {run} {system}: {r.tokens} tok, {r.decode_tok_s or 0:.1f} tok/s"
                    )


@workload("concurrency", "N concurrent streams: aggregate tok/s of delivered tokens, per-stream TTFT")
def concurrency(bench: Bench) -> None:
    s = bench.settings
    for key in ("llama.cpp smollm2", "mlx tiny"):
        family = bench.family(key)
        raws = [bench.raw(family)]
        if family.engine == "llama_cpp":  # issue 10: the unified-KV baseline stays as an extra row
            raws.append(bench.raw(family, kv_unified=True))
        for n in s.concurrency:
            case = f"{key} c={n}"
            with bench.servers(family, max_concurrency=n) as servers:
                for run in range(s.runs):
                    prompts = [story(run, i) for i in range(n)]
                    for target in rotate([*servers, *raws], run):
                        if isinstance(target, Server):
                            bodies = [chat_body(target.spec.model_name, p, s.max_tokens) for p in prompts]
                            results, wall = run_streams(target.url, bodies)
                            system = target.spec.system
                        else:
                            results = target.generate([target.chat_tokens(p) for p in prompts], s.max_tokens)
                            wall, system = max(r.t_last or 0.0 for r in results), target.name
                        _record_concurrent(bench, case, system, results, wall)


def _record_concurrent(
    bench: Bench, case: str, system: str, results: list[StreamResult], wall: float
) -> None:
    f, tokens = bench.figures, sum(r.tokens for r in results)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    f.add("concurrency", case, system, "agg_tok_s", tokens / wall if wall > 0 else None, tokens=tokens)
    f.add("concurrency", case, system, "ttft_median_s", statistics.median(ttfts) if ttfts else None)
    f.add("concurrency", case, system, "ttft_max_s", max(ttfts) if ttfts else None)
    f.add("concurrency", case, system, "incomplete", sum(not r.complete and r.error is None for r in results))
    errors = [r.error for r in results if r.error]
    f.add("concurrency", case, system, "errors", len(errors), error=errors[0] if errors else None)
    bench.log(
        f"  concurrency {case} {system}: {tokens} tok in {wall:.2f}s = {tokens / wall:.1f} tok/s, "
        f"{sum(not r.complete for r in results)} incomplete"
    )


@workload("prefill", "long prompt (~1500 tokens): time to first token")
def prefill(bench: Bench) -> None:
    s = bench.settings
    for key in ("llama.cpp smollm2", "mlx tiny"):  # SmolLM2's prefill on the MLX CPU backend takes minutes
        family = bench.family(key)
        raw = bench.raw(family)
        with bench.servers(family) as servers:
            for run in range(s.runs):
                text, n_prompt = long_prompt(run + 1, s.prefill_tokens, raw)
                case = f"{key} ~{s.prefill_tokens} tok"
                for target in rotate([*servers, raw], run):
                    if isinstance(target, Server):
                        r = run_streams(target.url, [chat_body(target.spec.model_name, text, 2)])[0][0]
                        system = target.spec.system
                    else:
                        r, system = target.generate([target.chat_tokens(text)], 2)[0], target.name
                    f = bench.figures
                    f.add("prefill", case, system, "ttft_s", r.ttft, prompt_tokens=n_prompt, error=r.error)
                    f.add("prefill", case, system, "prefill_tok_s", n_prompt / r.ttft if r.ttft else None)
                    bench.log(f"  prefill {case} {system}: {n_prompt} tok, ttft {r.ttft}")


# ---- process workloads --------------------------------------------------------------------
def _idle_specs(bench: Bench) -> list[ServerSpec]:
    """mlx-serve with a model in its profile but none loaded, and the peers as they start."""
    gguf, mlx = bench.family("llama.cpp smollm2"), bench.family("mlx smollm2")
    return [bench.spec(gguf, MLX_SERVE), bench.spec(mlx, MLX_LM_SERVER), bench.spec(gguf, LLAMA_CPP_SERVER)]


def _state(spec: ServerSpec) -> str:
    return LOADED_AT_START if spec.loads_at_start else "no model loaded"


@workload("startup", "process start to its health endpoint answering")
def startup(bench: Bench) -> None:
    for run in range(bench.settings.runs):
        for spec in rotate(_idle_specs(bench), run):
            with Server(spec, bench.workdir / "logs") as server:
                bench.figures.add(
                    "startup", "to ready", spec.system, "startup_s", server.startup_seconds,
                    path=spec.ready_path, state=_state(spec),
                )  # fmt: skip
                bench.log(f"  startup {spec.system}: {server.startup_seconds:.2f}s")


@workload("idle", "idle footprint after start: RSS, and CPU over a window (all servers idle together)")
def idle(bench: Bench) -> None:
    window = bench.settings.idle_window
    for _run in range(bench.settings.runs):
        with ExitStack() as stack:
            servers = [
                stack.enter_context(Server(spec, bench.workdir / "logs")) for spec in _idle_specs(bench)
            ]
            time.sleep(1.0)  # let start-up work (imports, first GC) finish
            before = {s.pid: s.cpu_seconds() for s in servers}
            t0 = time.perf_counter()
            time.sleep(window)
            elapsed = time.perf_counter() - t0
            for s in servers:
                cpu = (s.cpu_seconds() - before[s.pid]) / elapsed * 100
                state = _state(s.spec)
                bench.figures.add(
                    "idle", "after start", s.spec.system, "rss_mb", s.rss_bytes() / 2**20, state=state
                )
                bench.figures.add("idle", f"cpu over {window:g}s", s.spec.system, "cpu_pct", cpu, state=state)
                bench.log(f"  idle {s.spec.system}: rss {s.rss_bytes() / 2**20:.0f} MiB, cpu {cpu:.2f}%")


@workload("ttl_release", "mlx-serve only: RSS before a load, loaded, and after the model's TTL expired")
def ttl_release(bench: Bench) -> None:
    s = bench.settings
    for key in (
        ("llama.cpp smollm2", "mlx smollm2") if s.mlx_real_max_tokens else ("llama.cpp smollm2", "mlx tiny")
    ):
        family = bench.family(key)
        for _run in range(s.runs):
            spec = bench.spec(family, MLX_SERVE, ttl="1s")
            with Server(spec, bench.workdir / "logs") as server:
                _wait_ready(server)  # the daemon imports its engine libraries after start
                time.sleep(1.0)
                before = server.rss_bytes()
                r = run_streams(server.url, [chat_body(spec.model_name, "Say hi.", 2)])[0][0]
                loaded = server.rss_bytes()
                deadline = time.monotonic() + 60
                while server.get_json("/api/ps").get("models") and time.monotonic() < deadline:
                    time.sleep(0.2)
                unloaded = not server.get_json("/api/ps").get("models")
                time.sleep(1.0)
                after = server.rss_bytes()
                f, mb = bench.figures, 2**20
                f.add("ttl_release", key, MLX_SERVE, "rss_before_mb", before / mb)
                f.add("ttl_release", key, MLX_SERVE, "rss_loaded_mb", loaded / mb, error=r.error)
                f.add("ttl_release", key, MLX_SERVE, "rss_after_mb", after / mb, unloaded=unloaded)
                f.add("ttl_release", key, MLX_SERVE, "after_over_before", after / before)
                bench.log(f"  ttl {key}: {before / mb:.0f} -> {loaded / mb:.0f} -> {after / mb:.0f} MiB")


def _wait_ready(server: Server, timeout: float = 60.0) -> None:
    """Until /ready answers 200 (it says 503 while the engine libraries are being imported)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(server.url + "/ready", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"{server.spec.name} was not ready within {timeout:.0f}s")


def shown_seconds(values: Sequence[float | None]) -> str:
    """Per-request timings for the progress log: "0.123, -, 0.456" (- for a request with none)."""
    return ", ".join(f"{t:.3f}" if t is not None else "-" for t in values)
