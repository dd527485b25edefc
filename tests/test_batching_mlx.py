"""Continuous batching on the MLX engine (max_concurrency > 1), through the engine's public API.

The reference for every batched request is the same request run alone on an engine with
max_concurrency 1 (the one-request path, itself checked token for token against mlx-lm in
test_engine_mlx.py). The tiny random model (never emits EOS) carries the mechanics; the real
SmolLM2 only runs in the slow tests. Throughput figures are printed (run with -s), never asserted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mlx_serve.engines.errors import EngineNotLoadedError
from mlx_serve.engines.mlx import batch as mlx_batch
from mlx_serve.engines.mlx.engine import MLXEngine
from mlx_serve.engines.types import Event, Finished, GenerationRequest, Message, SamplingParams, TextDelta
from mlx_serve.profiles.schema import KVCache, ModelSpec, PromptLookup, Speculative

pytestmark = pytest.mark.asyncio(loop_scope="module")

STORY = (Message("user", "Tell me a short story about a lighthouse keeper."),)
CAPITAL = (Message("user", "What is the capital of France?"),)
# Bounded, so that even a random model must close the JSON (see test_structured_output.py).
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


# -- helpers ---------------------------------------------------------------------------------


@dataclass
class Result:
    text: str
    finished: Finished
    lps: list[Any]  # TokenLogprob, one per token: the requests ask for logprobs to compare token for token
    token_times: list[float]  # arrival of each token

    @property
    def tokens(self) -> list[str]:
        return [lp.token for lp in self.lps]


def chat(messages: Sequence[Message] = STORY, **options: Any) -> GenerationRequest:
    """Greedy, with logprobs, unless told otherwise."""
    response_format = options.pop("response_format", None)
    sampling = SamplingParams(**{"temperature": 0.0, "logprobs": True, **options})
    return GenerationRequest(messages=tuple(messages), sampling=sampling, response_format=response_format)


def raw(prompt: str, special: bool = True, **options: Any) -> GenerationRequest:
    sampling = SamplingParams(**{"temperature": 0.0, "logprobs": True, **options})
    return GenerationRequest(prompt=prompt, sampling=sampling, add_special_tokens=special)


async def run(engine: MLXEngine, request: GenerationRequest, on_event: Callable | None = None) -> Result:
    events: list[Event] = []
    deltas: list[TextDelta] = []
    token_times: list[float] = []
    async for event in engine.generate(request):
        events.append(event)
        if isinstance(event, TextDelta):
            deltas.append(event)
            token_times += [time.perf_counter()] * len(event.logprobs)
        if on_event is not None:
            on_event(event)
    assert isinstance(events[-1], Finished) and not any(isinstance(e, Finished) for e in events[:-1])
    lps = [lp for d in deltas for lp in d.logprobs]
    return Result("".join(d.text for d in deltas), events[-1], lps, token_times)


async def after(delay: float, engine: MLXEngine, request: GenerationRequest) -> Result:
    await asyncio.sleep(delay)
    return await run(engine, request)


async def staggered(
    engine: MLXEngine, requests: Sequence[GenerationRequest], gap: float = 0.02
) -> list[Result]:
    """All requests concurrently, each started `gap` seconds after the previous one."""
    return await asyncio.gather(*(after(i * gap, engine, r) for i, r in enumerate(requests)))


def assert_same(batched: Result, alone: Result) -> None:
    assert batched.tokens == alone.tokens  # token for token
    # How much of the prompt came from each engine's prefix cache depends on what it ran before.
    assert (batched.text, uncached(batched.finished)) == (alone.text, uncached(alone.finished))
    assert [lp.logprob for lp in batched.lps] == pytest.approx([lp.logprob for lp in alone.lps], abs=1e-4)
    assert [[t for t, _ in lp.top] for lp in batched.lps] == [[t for t, _ in lp.top] for lp in alone.lps]


def uncached(finished: Finished) -> Finished:
    return dataclasses.replace(finished, usage=dataclasses.replace(finished.usage, cached_prompt_tokens=0))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo(make_mlx_engine: Any, tiny_mlx: Path) -> MLXEngine:
    return await make_mlx_engine("tiny-solo", source=str(tiny_mlx))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def batched(make_mlx_engine: Any, tiny_mlx: Path) -> MLXEngine:
    return await make_mlx_engine("tiny-batched", source=str(tiny_mlx), max_concurrency=8)


# -- equivalence -----------------------------------------------------------------------------


async def test_batched_greedy_equals_each_alone(solo: MLXEngine, batched: MLXEngine) -> None:
    requests = [
        raw("Once upon a time", max_tokens=40),
        chat(STORY, max_tokens=60),
        raw("The lighthouse stood " * 40, max_tokens=25),  # a longer prompt
        chat(CAPITAL, max_tokens=50),
        raw("A", special=False, max_tokens=35),  # a one-token prompt
        raw("x " * 300, max_tokens=30),
    ]
    alone = [await run(solo, r) for r in requests]
    batched.counters.batch_peak = 0
    together = await staggered(batched, requests)
    assert batched.counters.batch_peak >= 3  # they really decoded together
    for b, a in zip(together, alone, strict=True):
        assert_same(b, a)


async def test_late_joiner_prefill_interleaves(solo: MLXEngine, batched: MLXEngine, monkeypatch: Any) -> None:
    # The tiny model prefills 1400 tokens well inside one step's time budget: cap the chunk to see it.
    monkeypatch.setattr(mlx_batch, "PREFILL_CHUNK", (8, 64, 256))
    first, late = raw("Keep going", max_tokens=400), raw("word " * 1400, max_tokens=20)
    assert await batched.count_tokens(late) > 5 * 256  # prefilled in 6 chunks or more
    seen = {"first": 0, "at late's first token": -1}

    def count(event: Event) -> None:
        seen["first"] += len(event.logprobs) if isinstance(event, TextDelta) else 0

    def mark(event: Event) -> None:
        if seen["at late's first token"] < 0:
            seen["at late's first token"] = seen["first"]

    running = asyncio.create_task(run(batched, first, count))
    while seen["first"] < 5:
        await asyncio.sleep(0.005)
    at_join = seen["first"]
    late_result = await run(batched, late, mark)
    assert not running.done()  # the late request finished while the first one still runs
    # The first stream kept flowing during the late prompt's chunked prefill (one chunk per step).
    assert seen["at late's first token"] - at_join >= 4
    assert_same(await running, await run(solo, first))
    assert_same(late_result, await run(solo, late))


async def test_per_request_sampling_and_stops(solo: MLXEngine, batched: MLXEngine) -> None:
    greedy = await run(solo, chat(max_tokens=30))
    i = next(i for i in range(8, 60) if greedy.text.find(greedy.text[i : i + 4]) == i)
    stop = greedy.text[i : i + 4]  # its first occurrence starts at i
    penalties = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    requests = {
        "greedy": chat(max_tokens=30),
        "top_k 1": chat(max_tokens=30, temperature=1.5, top_k=1),  # only the most likely token left
        "tiny top_p": chat(max_tokens=30, temperature=1.5, top_p=1e-6),
        "min_p 1": chat(max_tokens=30, temperature=1.5, min_p=1.0),
        "seed 7": chat(max_tokens=30, temperature=0.9, seed=7),
        "seed 7 again": chat(max_tokens=30, temperature=0.9, seed=7),
        "seed 8": chat(max_tokens=30, temperature=0.9, seed=8),
        "penalties": chat(max_tokens=30, **penalties),
        "stop": chat(max_tokens=30, stop=(stop,)),
        "top logprobs": chat(max_tokens=12, top_logprobs=3),
        "json": chat(CAPITAL, max_tokens=200, response_format={"type": "json_schema", "schema": PERSON}),
    }
    batched.counters.batch_peak = 0
    results = dict(zip(requests, await staggered(batched, list(requests.values()), gap=0.0), strict=True))
    assert batched.counters.batch_peak >= 8
    assert_same(results["greedy"], greedy)
    for name in ("top_k 1", "tiny top_p", "min_p 1"):
        assert results[name].text == greedy.text, name
    seeded = results["seed 7"].text
    assert seeded == results["seed 7 again"].text != results["seed 8"].text
    assert seeded != greedy.text  # it really sampled
    assert (await run(batched, requests["seed 7"])).text == seeded  # the same alone as in a batch
    assert_same(results["penalties"], await run(solo, requests["penalties"]))
    assert results["penalties"].lps != greedy.lps  # the penalties did reshape the logits
    stopped = results["stop"]
    assert stopped.text == greedy.text[:i] and stopped.finished.reason == "stop"
    assert stopped.finished.stop_sequence == stop
    assert_same(results["top logprobs"], await run(solo, requests["top logprobs"]))
    assert all(len(lp.top) == 3 for lp in results["top logprobs"].lps)
    assert results["json"].finished.reason == "stop"
    assert set(json.loads(results["json"].text)) == {"name", "age"}
    assert_same(results["json"], await run(solo, requests["json"]))


# -- leaving, failing, capacity --------------------------------------------------------------


async def test_cancel_one_others_continue(solo: MLXEngine, batched: MLXEngine) -> None:
    keep = [raw("First of three", max_tokens=120), chat(CAPITAL, max_tokens=90)]
    before = batched.counters.tokens_generated
    received = 0
    stream = batched.generate(raw("Cancel me", max_tokens=1500))

    async def consume_then_leave() -> None:
        nonlocal received
        async for event in stream:
            received += len(event.logprobs) if isinstance(event, TextDelta) else 0
            if received >= 10:
                return await stream.aclose()  # the client went away

    kept = asyncio.gather(*(run(batched, r) for r in keep))
    await consume_then_leave()
    results = await kept
    for b, r in zip(results, keep, strict=True):
        assert_same(b, await run(solo, r))
    produced = (
        batched.counters.tokens_generated - before - sum(r.finished.usage.completion_tokens for r in results)
    )
    # Pipelined decode: the token being computed when the stream closed, plus at most one step more
    # before the scheduler sees the flag, plus what was emitted but not yet read.
    assert received <= produced <= received + 4, f"{produced - received} tokens after the stream closed"


async def test_failing_request_ends_alone(
    solo: MLXEngine, batched: MLXEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan_for, calls = batched._plan, itertools.count(1)

    def exploding(tokens: Any, logits: Any) -> Any:  # stands in for a broken JSON constraint
        if next(calls) == 3:
            raise RuntimeError("processor exploded")
        return logits

    async def plan(request: GenerationRequest) -> Any:
        plan = await plan_for(request)
        return dataclasses.replace(plan, constraint=exploding) if request.prompt == "Broken" else plan

    monkeypatch.setattr(batched, "_plan", plan)
    good = [raw("Fine one", max_tokens=40), raw("Fine two", max_tokens=30)]
    broken, *fine = await staggered(batched, [raw("Broken", max_tokens=40), *good], gap=0.0)
    assert broken.finished.reason == "error" and "processor exploded" in (broken.finished.error or "")
    assert broken.finished.usage.completion_tokens <= 3
    for b, r in zip(fine, good, strict=True):
        assert_same(b, await run(solo, r))


async def test_eight_concurrent_complete(solo: MLXEngine, batched: MLXEngine) -> None:
    requests = [raw(f"Request {i}: " * (i + 1), max_tokens=30 + 9 * i) for i in range(0, 8, 2)]
    requests += [chat(STORY, max_tokens=40 + 7 * i) for i in range(1, 8, 2)]
    idle, peak = batched.memory_bytes(), [0]
    batched.counters.batch_peak = 0
    results = await asyncio.gather(
        *(run(batched, r, lambda _: peak.append(batched.memory_bytes())) for r in requests)
    )
    assert batched.counters.batch_peak == 8
    # The batch's KV cache is counted while it runs; afterwards only the kept prefixes are.
    prefix = batched.prefix_cache
    assert prefix is not None and max(peak) > idle
    assert batched.memory_breakdown()["kv_cache"] == prefix.nbytes > 0
    for result, request in zip(results, requests, strict=True):
        assert result.finished.reason == "length"
        assert result.finished.usage.completion_tokens == request.sampling.max_tokens == len(result.tokens)
    for result, request in zip(results[:3], requests[:3], strict=True):  # a sample against the solo path
        assert_same(result, await run(solo, request))


async def test_max_concurrency_caps_batch(make_mlx_engine: Any, solo: MLXEngine, tiny_mlx: Path) -> None:
    engine = await make_mlx_engine("tiny-cap2", source=str(tiny_mlx), max_concurrency=2)
    lengths = {"short": 15, "long": 80, "third": 15, "fourth": 15}
    order: list[tuple[str, str]] = []

    async def one(name: str) -> Result:
        request = raw(f"{name} request", max_tokens=lengths[name])
        return await run(engine, request, lambda event: order.append((name, type(event).__name__)))

    # short and long first (tokenizing runs off the engine thread, so a gather of all four could
    # enqueue them in any order), then third and fourth, which must wait for a free place
    first = [asyncio.ensure_future(one(name)) for name in ("short", "long")]
    for _ in range(3000):  # at most 30 s
        if {name for name, _ in order} == {"short", "long"} or any(f.done() for f in first):
            break
        await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(one(name)) for name in ("third", "fourth")]
    results = await asyncio.gather(*first, *later)
    assert engine.counters.batch_peak == 2
    assert [r.finished.usage.completion_tokens for r in results] == list(lengths.values())
    third_starts = order.index(next(e for e in order if e[0] == "third"))
    assert order.index(("short", "Finished")) < third_starts < order.index(("long", "Finished"))
    for result, name in zip(results, lengths, strict=True):
        assert_same(result, await run(solo, raw(f"{name} request", max_tokens=lengths[name])))


async def test_speculative_and_kv_bits_stay_single(make_mlx_engine: Any, tiny_mlx: Path) -> None:
    assert mlx_batch.single_request_reason(ModelSpec(source="x", max_concurrency=4)) is None
    kv = ModelSpec(source="x", max_concurrency=4, kv_cache=KVCache(bits=8, group_size=32))
    assert "quantized KV cache" in (mlx_batch.single_request_reason(kv) or "")
    lookup = Speculative(prompt_lookup=PromptLookup())
    engine = await make_mlx_engine(
        "tiny-lookup4", source=str(tiny_mlx), max_concurrency=4, speculative=lookup
    )
    assert "speculative" in (mlx_batch.single_request_reason(engine.spec) or "")
    results = await asyncio.gather(*(run(engine, raw(f"Lookup {i}", max_tokens=10)) for i in range(3)))
    assert all(r.finished.usage.completion_tokens == 10 for r in results)
    assert engine.counters.batch_peak == 0 and engine.counters.requests == 3


async def test_rotating_kv_cache_batches(make_mlx_engine: Any, tiny_mlx: Path) -> None:
    spec = {"source": str(tiny_mlx), "kv_cache": KVCache(max_size=64)}
    alone_engine = await make_mlx_engine("tiny-rot1", **spec)
    batch_engine = await make_mlx_engine("tiny-rot4", max_concurrency=4, **spec)
    requests = [raw("Rotate " * (10 + 40 * i), max_tokens=90) for i in range(3)]
    together = await staggered(batch_engine, requests)
    assert batch_engine.counters.batch_peak >= 2
    for b, r in zip(together, requests, strict=True):
        assert_same(b, await run(alone_engine, r))


async def test_unload_waits_for_batch(tiny_mlx: Path) -> None:
    engine = MLXEngine("tiny-unload-batch", ModelSpec(source=str(tiny_mlx), engine="mlx", max_concurrency=4))
    await engine.load()
    started = asyncio.Event()
    streams = [asyncio.create_task(run(engine, raw("Drain 0", max_tokens=60), lambda _: started.set()))]
    streams.append(asyncio.create_task(run(engine, raw("Drain 1", max_tokens=60))))
    await started.wait()
    await asyncio.wait_for(engine.unload(), 30)  # runs once the batch loop hands the thread back
    results = await asyncio.gather(*streams)
    assert [r.finished.usage.completion_tokens for r in results] == [60, 60]  # in-flight streams finished
    assert engine.memory_bytes() == 0
    with pytest.raises(EngineNotLoadedError):
        await engine.generate(raw("Hello")).__anext__()
    await engine.load()
    assert (await run(engine, raw("Hello", max_tokens=3))).finished.usage.completion_tokens == 3
    await asyncio.wait_for(engine.unload(), 10)  # an idle batch loop does not hold the thread


# -- throughput (printed, not asserted: ARCHITECTURE.md "Conventions") -------------------------------------------


def decode_rate(token_times: Sequence[Sequence[float]]) -> float:
    """Aggregate tok/s while every stream decodes: from the moment the last stream got its first
    token to the last token, counting the tokens in that window (prefill excluded)."""
    start, end = max(times[0] for times in token_times), max(times[-1] for times in token_times)
    tokens = sum(1 for times in token_times for t in times if t > start)
    return tokens / (end - start) if end > start else 0.0


async def engine_rate(engine: MLXEngine, batch: int, max_tokens: int) -> float:
    requests = [raw(f"Stream {i} says", max_tokens=max_tokens) for i in range(batch)]
    results = await asyncio.gather(*(run(engine, r) for r in requests))
    assert all(r.finished.usage.completion_tokens == max_tokens for r in results)  # no stream cut short
    return decode_rate([r.token_times for r in results])


async def measure(make_mlx_engine: Any, folder: Path, name: str, max_tokens: int) -> None:
    """Aggregate decode tok/s through the engine at batch 1, 2, 4, 8, and on the one-request path.
    (Ratios against the raw engine and the peers: the benchmark harness, tests/bench.)"""
    engine = await make_mlx_engine(f"{name}-rate", source=str(folder), max_concurrency=8)
    single = await make_mlx_engine(f"{name}-rate-solo", source=str(folder))
    await engine_rate(engine, 2, 4)  # warm-up
    rates = {f"batch {b}": await engine_rate(engine, b, max_tokens) for b in (1, 2, 4, 8)}
    rates["one-request path"] = await engine_rate(single, 1, max_tokens)
    print(f"\n{name}, aggregate decode tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    assert all(rate > 0 for rate in rates.values())


async def test_throughput_tiny(make_mlx_engine: Any, tiny_mlx: Path) -> None:
    await measure(make_mlx_engine, tiny_mlx, "tiny", max_tokens=64)


# -- the real model (slow: MLX's CPU backend runs SmolLM2 at a few tok/s) ---------------------


@pytest.mark.slow
async def test_smollm2_batched_greedy_equals_alone(make_mlx_engine: Any, smollm2_mlx: Path) -> None:
    alone_engine = await make_mlx_engine("smollm2-solo", source=str(smollm2_mlx))
    batch_engine = await make_mlx_engine("smollm2-batched", source=str(smollm2_mlx), max_concurrency=4)
    requests = [
        chat(CAPITAL, max_tokens=10),
        chat(STORY, max_tokens=8),
        raw("The capital of Germany is", max_tokens=6),
    ]
    together = await staggered(batch_engine, requests)
    assert batch_engine.counters.batch_peak >= 2
    for b, r in zip(together, requests, strict=True):
        assert_same(b, await run(alone_engine, r))
    assert all(b.text.strip() for b in together)  # the words are the CPU kernels' choice, not checked


@pytest.mark.slow
async def test_throughput_smollm2(make_mlx_engine: Any, smollm2_mlx: Path) -> None:
    await measure(make_mlx_engine, smollm2_mlx, "smollm2", max_tokens=12)
