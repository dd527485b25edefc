"""Continuous batching in the llama.cpp engine (max_concurrency > 1), through its public async API.

The reference for every request is the same request run alone on a max_concurrency = 1 engine
(the one-at-a-time path, itself checked against llama-cpp-python in test_engine_llamacpp.py).
A spy on llama_decode shows what each step of the scheduler decoded: which sequences, how many.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp._internals import LlamaBatch, LlamaContext

from mlx_serve.engines.errors import ContextOverflowError, UnsupportedRequestError
from mlx_serve.engines.llamacpp.engine import LlamaCppEngine
from mlx_serve.engines.llamacpp.load import physical_cores
from mlx_serve.engines.types import Finished, GenerationRequest, Message, SamplingParams, TextDelta
from mlx_serve.profiles.schema import ModelSpec, PromptLookup, Speculative

STORY = "Once upon a time, in a small village by the sea, there lived"
WORDS = ("a", "the old baker", "two cats", "nobody", "a king")
PROMPTS = [f"{STORY} {w}" for w in WORDS] + ["1 2 3 4 5 6 7 8 9", "Hello", "The quick brown fox jumps. " * 5]
CAPITAL = Message("user", "What is the capital of France? Answer in one sentence.")
TOPICS = ("cats", "the sea", "rain", "music", "bread", "Python")
QUESTIONS = [CAPITAL, Message("user", "Name three colors.")] + [
    Message("user", f"About {t}?") for t in TOPICS
]


def spec(path: Path, context_length: int = 512, **kw) -> ModelSpec:
    return ModelSpec(source=str(path), engine="llama_cpp", context_length=context_length, **kw)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def sampled(max_tokens: int, temperature: float, seed: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, **kw)


@dataclass
class Run:
    events: list = field(default_factory=list)
    done: Finished | None = None
    start: float = 0.0
    first: float | None = None  # seconds from start to the first text
    end: float = 0.0

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def logprobs(self) -> list:
        return [lp for e in self.events if isinstance(e, TextDelta) for lp in e.logprobs]

    @property
    def pieces(self) -> list[str]:
        return [lp.token for lp in self.logprobs]


async def run(engine: LlamaCppEngine, request: GenerationRequest, order: list | None = None) -> Run:
    r = Run(start=time.perf_counter())
    async for event in engine.generate(request):
        if r.first is None and isinstance(event, TextDelta):
            r.first = time.perf_counter() - r.start
        r.events.append(event)
    r.end = time.perf_counter() - r.start
    assert isinstance(r.events[-1], Finished) and not any(isinstance(e, Finished) for e in r.events[:-1])
    r.done, r.events = r.events[-1], r.events[:-1]
    if order is not None:
        order.append(request)
    return r


def loaded(engine: LlamaCppEngine) -> Iterator[LlamaCppEngine]:
    asyncio.run(engine.load())
    yield engine
    asyncio.run(engine.unload())


@pytest.fixture(scope="module")
def tiny1(tiny_gguf: Path) -> Iterator[LlamaCppEngine]:
    yield from loaded(LlamaCppEngine("tiny1", spec(tiny_gguf)))


@pytest.fixture(scope="module")
def tiny8(tiny_gguf: Path) -> Iterator[LlamaCppEngine]:
    yield from loaded(LlamaCppEngine("tiny8", spec(tiny_gguf, max_concurrency=8)))


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int, bool]]]:
    """Each llama_decode of the batch scheduler: its (sequence id, position, logits) entries."""
    log: list[list[tuple[int, int, bool]]] = []
    real = llama_cpp.llama_decode

    def spy(ctx, batch):
        log.append([(batch.seq_id[j][0], batch.pos[j], bool(batch.logits[j])) for j in range(batch.n_tokens)])
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", spy)
    return log


def seqs_in(step: list[tuple[int, int, bool]]) -> set[int]:
    return {seq for seq, _, _ in step}


async def test_tiny_batch_equals_each_request_alone(
    tiny8: LlamaCppEngine, tiny1: LlamaCppEngine, steps
) -> None:
    requests = [GenerationRequest(prompt=p, sampling=greedy(40, logprobs=True)) for p in PROMPTS]
    alone = [await run(tiny1, r) for r in requests]
    batched = await asyncio.gather(*(run(tiny8, r) for r in requests))
    for a, b in zip(alone, batched, strict=True):
        assert b.pieces == a.pieces and b.text == a.text
        assert b.done.reason == "length" and b.done.usage.completion_tokens == 40
        assert b.done.usage.prompt_tokens == a.done.usage.prompt_tokens
    assert tiny1._model.batch is None and llama_cpp.llama_n_seq_max(tiny1._model.llm.ctx) == 1
    assert tiny8.info().context_length == 512  # what one request may use, as with max_concurrency 1
    assert max(len(seqs_in(s)) for s in steps) == 8  # all eight decoded together...
    assert len(steps) <= 8 + 40  # ...a prefill each, then 39 joint steps, not 8 * 40 decodes


async def test_smollm2_batch_equals_each_request_alone(smollm2_gguf: Path) -> None:
    """Bit for bit, the real model too: each sequence attends over its own KV stream (see
    llamacpp.load.use_sequences); a unified cache made this text fork at near-ties."""
    one = LlamaCppEngine("smol1", spec(smollm2_gguf))
    many = LlamaCppEngine("smol8", spec(smollm2_gguf, max_concurrency=8))
    await one.load()
    await many.load()
    try:
        requests = [GenerationRequest(messages=(q,), sampling=greedy(20, logprobs=True)) for q in QUESTIONS]
        alone = [await run(one, r) for r in requests]
        batched = await asyncio.gather(*(run(many, r) for r in requests))
        assert batched[0].text.strip()  # the words are the CPU kernels' choice; alone is the reference
        for a, b in zip(alone, batched, strict=True):
            assert b.logprobs == a.logprobs  # the same tokens with the same logprobs, bit for bit
            assert b.done.reason == "stop" or b.done.usage.completion_tokens == 20  # complete
    finally:
        await one.unload()
        await many.unload()


async def test_whole_context_each_and_contiguous_ids(tiny_gguf: Path, steps) -> None:
    engine = LlamaCppEngine("tiny-256x4", spec(tiny_gguf, 256, max_concurrency=4))
    await engine.load()
    try:
        ctx = engine._model.llm.ctx  # one context, a KV stream of the profile's context per sequence
        assert llama_cpp.llama_n_seq_max(ctx) == 4 and llama_cpp.llama_n_ctx_seq(ctx) == 256
        # f16 KV of 4 * 256 positions * 2 layers * 2 kv heads * (16 + 16) dims * 2 bytes
        assert engine.memory_bytes() == tiny_gguf.stat().st_size + 4 * 256 * 2 * 2 * 32 * 2
        a, b, c = (
            asyncio.create_task(run(engine, GenerationRequest(prompt=p, sampling=greedy(n))))
            for p, n in ((PROMPTS[0], 1000), (PROMPTS[1], 3), (PROMPTS[2], 1000))
        )
        await b
        await run(engine, GenerationRequest(prompt="Something else entirely", sampling=greedy(5)))
        assert all(r.done.reason == "length" and r.done.usage.total_tokens == 256 for r in [await a, await c])
        # The late one took b's slot (1), not the empty 3: one run of ids, one pass over the weights.
        assert all(seqs_in(s) <= {0, 1, 2} for s in steps)
    finally:
        await engine.unload()


async def test_late_joiner_does_not_wait(tiny8: LlamaCppEngine, tiny1: LlamaCppEngine) -> None:
    long = GenerationRequest(prompt=STORY, sampling=greedy(300, logprobs=True))
    late = GenerationRequest(prompt=PROMPTS[7], sampling=greedy(8, logprobs=True))
    expected_long, expected_late = await run(tiny1, long), await run(tiny1, late)
    first = tiny8.generate(long)
    head = [await anext(first) for _ in range(20)]
    joined = time.perf_counter()
    b = await run(tiny8, late)
    rest = [e async for e in first]
    remaining = time.perf_counter() - joined  # the long stream's time left when the late one arrived
    print(
        f"\nlate joiner: ttft {b.first:.4f} s, done {b.end:.4f} s; the running stream had {remaining:.3f} s left"
    )
    assert b.pieces == expected_late.pieces
    a = [lp.token for e in head + rest if isinstance(e, TextDelta) for lp in e.logprobs]
    assert a == expected_long.pieces  # the join did not disturb the running stream
    assert b.end < remaining / 3 and b.first < remaining / 5


async def test_per_request_settings_in_one_batch(tiny8: LlamaCppEngine, tiny1: LlamaCppEngine) -> None:
    base = (await run(tiny1, GenerationRequest(prompt=STORY, sampling=greedy(30, logprobs=True)))).pieces
    k = next(i for i in range(5, 29) if len(base[i]) >= 2 and len(base[i + 1]) >= 2)
    stop = base[k][-2:] + base[k + 1][:2]
    number = {"type": "integer", "minimum": 0, "maximum": 999}
    schema = {"type": "object", "properties": {"n": number}, "required": ["n"], "additionalProperties": False}
    json_schema = {"type": "json_schema", "schema": schema}
    requests = [
        GenerationRequest(prompt=STORY, sampling=greedy(30, stop=("zzzz", stop))),
        GenerationRequest(prompt=STORY, sampling=sampled(24, 0.8, seed=7)),
        GenerationRequest(prompt=STORY, sampling=sampled(24, 0.8, seed=7)),
        GenerationRequest(prompt=STORY, sampling=sampled(20, 1.2, seed=3, top_k=5, top_p=0.9)),
        GenerationRequest(
            prompt=PROMPTS[1], sampling=greedy(20, repetition_penalty=1.5, frequency_penalty=0.5)
        ),
        GenerationRequest(prompt=PROMPTS[2], sampling=greedy(5, logprobs=True, top_logprobs=3)),
        GenerationRequest(prompt=PROMPTS[3], sampling=greedy(200), response_format=json_schema),
    ]
    alone = [await run(tiny1, r) for r in requests]
    batched = await asyncio.gather(*(run(tiny8, r) for r in requests))
    for a, b in zip(alone, batched, strict=True):
        assert (b.text, b.done.reason, b.done.stop_sequence) == (a.text, a.done.reason, a.done.stop_sequence)
        assert b.done.usage.completion_tokens == a.done.usage.completion_tokens
        assert [[t for t, _ in lp.top] for lp in b.logprobs] == [[t for t, _ in lp.top] for lp in a.logprobs]
        values = [v for lp in b.logprobs for _, v in lp.top]  # equal up to float noise (see above)
        assert values == pytest.approx([v for lp in a.logprobs for _, v in lp.top], abs=1e-2)
    full = "".join(base)
    assert batched[0].text == full[: full.index(stop)] and batched[0].done.stop_sequence == stop
    assert batched[1].text == batched[2].text != batched[3].text  # same seed, same text
    assert batched[5].done.reason == "length" and len(batched[5].logprobs[0].top) == 3
    assert isinstance(json.loads(batched[6].text)["n"], int) and batched[6].done.reason == "stop"


async def test_cancel_one_others_continue(tiny8: LlamaCppEngine, tiny1: LlamaCppEngine, steps) -> None:
    requests = [GenerationRequest(prompt=p, sampling=greedy(150, logprobs=True)) for p in PROMPTS[:3]]
    expected = [await run(tiny1, r) for r in (requests[0], requests[2])]
    steps.clear()
    doomed = tiny8.generate(requests[1])
    others = [asyncio.create_task(run(tiny8, r)) for r in (requests[0], requests[2])]
    for _ in range(5):
        await anext(doomed)
    await doomed.aclose()
    at_close = len(steps)
    survivors = await asyncio.gather(*others)
    for got, want in zip(survivors, expected, strict=True):
        assert got.pieces == want.pieces and got.done.usage.completion_tokens == 150
    after = [len(seqs_in(s)) for s in steps[at_close:]]
    assert after.count(3) <= 2 and after[-1] == 2, after[:10]  # gone within two steps
    # Its slot is free again: a new request runs at once and gives its own output.
    again = await run(tiny8, requests[1])
    assert again.pieces == (await run(tiny1, requests[1])).pieces


async def test_max_concurrency_caps_the_batch(tiny8: LlamaCppEngine, tiny1: LlamaCppEngine, steps) -> None:
    requests = [GenerationRequest(prompt=p, sampling=greedy(48)) for p in PROMPTS]
    requests.append(GenerationRequest(prompt="A ninth request", sampling=greedy(6)))
    expected = [(await run(tiny1, r)).text for r in requests]
    order: list[GenerationRequest] = []
    results = await asyncio.gather(*(run(tiny8, r, order) for r in requests))
    assert [r.text for r in results] == expected
    assert all(r.done.usage.completion_tokens == n for r, n in zip(results, [48] * 8 + [6], strict=True))
    assert max(len(seqs_in(s)) for s in steps) == 8
    assert order[-1] is requests[-1]  # 6 tokens, yet last: it waited for a free slot
    ninth, first8 = results[-1].first * 1000, max(r.end for r in results[:8]) * 1000
    print(f"\n9th request: first token after {ninth:.0f} ms, the first 8 took {first8:.0f} ms")


async def test_count_tokens_and_errors_do_not_wait_or_spread(tiny8: LlamaCppEngine) -> None:
    stream = asyncio.create_task(run(tiny8, GenerationRequest(prompt=STORY, sampling=greedy(400))))
    await asyncio.sleep(0.05)
    assert await tiny8.count_tokens(GenerationRequest(prompt=PROMPTS[7])) > 30
    with pytest.raises(ContextOverflowError):
        await run(tiny8, GenerationRequest(prompt=STORY * 40))
    with pytest.raises(UnsupportedRequestError):
        await run(tiny8, GenerationRequest(prompt="def f(", suffix="return 1"))
    assert not stream.done()  # all of that ran between steps of the running stream
    assert (await stream).done.usage.completion_tokens == 400


async def test_prefix_reuse_per_sequence(tiny8: LlamaCppEngine, tiny1: LlamaCppEngine) -> None:
    a = GenerationRequest(prompt=STORY + " a wise old fisherman who", sampling=greedy(10))
    b = GenerationRequest(prompt="Completely different words here", sampling=greedy(10))
    first = await run(tiny8, a)
    await run(tiny8, b)  # takes another slot: a's cache survives
    again = await run(tiny8, a)
    assert again.done.usage.cached_prompt_tokens == again.done.usage.prompt_tokens - 1
    assert again.text == first.text == (await run(tiny1, a)).text
    edited = GenerationRequest(prompt=STORY + " a wise young fisherman who", sampling=greedy(10))
    cached = (await run(tiny8, edited)).done.usage.cached_prompt_tokens
    assert 10 < cached < again.done.usage.prompt_tokens - 2


async def test_prompt_lookup_only_when_alone(tiny_gguf: Path, tiny1: LlamaCppEngine) -> None:
    lookup = Speculative(prompt_lookup=PromptLookup(max_ngram=3, num_pred_tokens=8))
    engine = LlamaCppEngine("tiny-pld8", spec(tiny_gguf, max_concurrency=4, speculative=lookup))
    await engine.load()
    try:
        sampling = greedy(100, logprobs=True)
        requests = [GenerationRequest(prompt=p, sampling=sampling) for p in ("1 2 3 4 5 6 7 8 9 10", STORY)]
        expected = [(await run(tiny1, r)).pieces for r in requests]
        alone = [await run(engine, r) for r in requests]
        assert [r.pieces for r in alone] == expected and sum(r.done.usage.drafted_tokens for r in alone) > 0
        together = await asyncio.gather(*(run(engine, r) for r in requests))
        assert [r.pieces for r in together] == expected
        assert all(r.done.usage.drafted_tokens == 0 for r in together)  # never alone: no drafts
    finally:
        await engine.unload()


async def test_reload_and_embeddings_unaffected(tiny_gguf: Path) -> None:
    engine = LlamaCppEngine("tiny-re", spec(tiny_gguf, max_concurrency=2))
    for _ in range(2):
        await engine.load()
        requests = [GenerationRequest(prompt=p, sampling=greedy(5)) for p in PROMPTS[:3]]
        runs = await asyncio.gather(*(run(engine, r) for r in requests))
        assert all(r.done.usage.completion_tokens == 5 for r in runs)
        await engine.unload()
    assert engine.memory_bytes() == 0
    embed = LlamaCppEngine("embed4", spec(tiny_gguf, embedding=True, max_concurrency=4))
    await embed.load()
    try:
        assert embed._model.batch is None
        vectors = await asyncio.gather(*(embed.embed([f"text {i}"]) for i in range(4)))
        assert all(len(v[0]) == 64 for v in vectors)
    finally:
        await embed.unload()


def _raw_tok_s(llm: Llama, contexts: dict, prompts: list[list[int]], max_tokens: int, unified: bool) -> float:
    """the unified-KV raw figure (ARCHITECTURE.md "Verified facts"): one context with n_seq_max = n (unified KV as first measured, or a
    stream per sequence as the engine uses; kept across runs), one llama_decode per step for all n
    sequences, greedy (argmax), prefill included."""
    n, nv = len(prompts), llm.n_vocab()
    if (n, unified) not in contexts:
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx, params.n_seq_max, params.kv_unified = 512 * n, n, unified
        contexts[n, unified] = LlamaContext(model=llm._model, params=params, verbose=False)
    ctx, batch = contexts[n, unified], LlamaBatch(n_tokens=512, embd=0, n_seq_max=1)
    ctx.kv_cache_clear()
    try:
        start, b = time.perf_counter(), batch.batch
        entries = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        for _ in range(max_tokens):
            for j, (t, pos, s, logits) in enumerate(entries):
                b.token[j], b.pos[j], b.n_seq_id[j], b.seq_id[j][0], b.logits[j] = t, pos, 1, s, logits
            b.n_tokens = len(entries)
            assert llama_cpp.llama_decode(ctx.ctx, b) == 0
            rows = [j for j, e in enumerate(entries) if e[3]]
            last = {s: pos for _, pos, s, _ in entries}
            row = lambda j: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, j), shape=(nv,))  # noqa: E731
            entries = [(int(row(j).argmax()), last[s] + 1, s, True) for s, j in enumerate(rows)]
        return n * max_tokens / (time.perf_counter() - start)
    finally:
        batch.close()


@pytest.mark.slow
async def test_throughput_against_raw_llama_cpp(smollm2_gguf: Path) -> None:
    """Aggregate tok/s at batch 1/2/4/8 on SmolLM2: the engine next to the raw batched loop, unified
    KV (the first measured figure) and split (the engine's layout), interleaved in the same run (median of 3
    pairs: this machine is shared); short prompts. Printed, not asserted (ARCHITECTURE.md "Conventions")."""
    threads, max_tokens = physical_cores(), 64
    texts = [f"Story number {i}: once upon a time, in a land far away," for i in range(8)]
    rounds = iter(range(1000))  # a new prompt prefix each round: no prefix reuse, like the raw loop
    llm = Llama(str(smollm2_gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    engine = LlamaCppEngine("smol8", spec(smollm2_gguf, max_concurrency=8))
    await engine.load()
    contexts: dict = {}

    async def tok_s(n: int) -> float:
        start, k = time.perf_counter(), next(rounds)
        requests = [GenerationRequest(prompt=f"{k} {t}", sampling=greedy(max_tokens)) for t in texts[:n]]
        runs = await asyncio.gather(*(run(engine, r) for r in requests))
        return sum(r.done.usage.completion_tokens for r in runs) / (time.perf_counter() - start)

    try:
        print(
            "\nbatch | raw unified | raw split | engine tok/s | engine/unified | engine/split  (first measured: 135, 205 at 8)"
        )
        for n in (1, 2, 4, 8):
            prompts = [llm.tokenize(t.encode(), add_bos=True) for t in texts[:n]]
            (
                _raw_tok_s(llm, contexts, prompts, 8, True),
                _raw_tok_s(llm, contexts, prompts, 8, False),
            )  # warm-up
            runs = []
            for _ in range(3):
                unified, split = (_raw_tok_s(llm, contexts, prompts, max_tokens, u) for u in (True, False))
                runs.append((unified, split, await tok_s(n)))
            u, s, e = (statistics.median(column) for column in zip(*runs, strict=True))
            ratios = [statistics.median(r[2] / r[i] for r in runs) for i in (0, 1)]
            print(f"{n:>5} | {u:>11.1f} | {s:>9.1f} | {e:>12.1f} | {ratios[0]:>14.2f} | {ratios[1]:>12.2f}")
    finally:
        await engine.unload()
        for ctx in contexts.values():
            ctx.close()
        llm.close()
