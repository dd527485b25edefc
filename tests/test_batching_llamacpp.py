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
from mlx_serve.engines.llamacpp_engine import LlamaCppEngine
from mlx_serve.engines.llamacpp_load import physical_cores
from mlx_serve.engines.types import Finished, GenerationRequest, Message, SamplingParams, TextDelta
from mlx_serve.profiles.schema import ModelSpec, PromptLookup, Speculative

STORY = "Once upon a time, in a small village by the sea, there lived"
WORDS = ("a", "the old baker", "two cats", "nobody", "a king")
PROMPTS = [f"{STORY} {w}" for w in WORDS] + ["1 2 3 4 5 6 7 8 9", "Hello", "The quick brown fox jumps. " * 5]
CAPITAL = Message("user", "What is the capital of France? Answer in one sentence.")
TOPICS = ("cats", "the sea", "rain", "music", "bread")
QUESTIONS = [CAPITAL, Message("user", "Name three colors.")] + [
    Message("user", f"Write about {t}.") for t in TOPICS
]


def spec(path: Path, **kw) -> ModelSpec:
    return ModelSpec(source=str(path), engine="llama_cpp", context_length=512, **kw)


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


def test_one_context_holds_n_sequences(tiny8: LlamaCppEngine, tiny1: LlamaCppEngine) -> None:
    ctx = tiny8._model.llm.ctx
    assert llama_cpp.llama_n_seq_max(ctx) == 8 and llama_cpp.llama_n_ctx(ctx) == 8 * 512
    assert tiny8.info().context_length == 512  # what one request may use, as with max_concurrency 1
    # f16 KV of 8 * 512 positions * 2 layers * 2 kv heads * (16 + 16) dims * 2 bytes
    size = Path(tiny8.spec.source).stat().st_size
    assert tiny8.memory_bytes() == size + 8 * 512 * 2 * 2 * 32 * 2
    assert tiny1._model.batch is None and llama_cpp.llama_n_seq_max(tiny1._model.llm.ctx) == 1


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
    assert max(len(seqs_in(s)) for s in steps) == 8  # all eight decoded together...
    assert len(steps) <= 45  # ...in about 40 steps, not 8 * 40


async def test_smollm2_alone_and_eight_in_a_batch(smollm2_gguf: Path) -> None:
    """Alone: exactly the one-at-a-time output. Eight at once: all complete; llama.cpp's CPU attention
    is not batch-invariant (llamacpp_batch.py explains it), so greedy text may fork, at near-ties only."""
    one = LlamaCppEngine("smol1", spec(smollm2_gguf))
    many = LlamaCppEngine("smol8", spec(smollm2_gguf, max_concurrency=8))
    await one.load()
    await many.load()
    try:
        requests = [
            GenerationRequest(messages=(q,), sampling=greedy(20, logprobs=True, top_logprobs=2))
            for q in [*QUESTIONS, Message("user", "What is Python?")]
        ]
        alone = [await run(one, r) for r in requests]
        assert "Paris" in alone[0].text
        for r, a in zip(requests[:3], alone, strict=False):
            assert (await run(many, r)).pieces == a.pieces
        batched = await asyncio.gather(*(run(many, r) for r in requests))
        assert "Paris" in batched[0].text
        for a, b in zip(alone, batched, strict=True):
            assert b.done.reason == "stop" or b.done.usage.completion_tokens == 20  # complete
            n = min(len(a.pieces), len(b.pieces))
            fork = next((i for i in range(n) if a.pieces[i] != b.pieces[i]), None)
            if fork is None and len(a.pieces) != len(b.pieces):
                fork = n  # one of them ended there (end-of-generation token)
            shared = zip(a.logprobs[:fork], b.logprobs, strict=False)
            assert all(abs(x.logprob - y.logprob) < 1.0 for x, y in shared)
            if fork is not None:  # a near-tie, not a wrong token, in whichever run went on
                top = (a.logprobs if fork < len(a.logprobs) else b.logprobs)[fork].top
                assert top[0][1] - top[1][1] < 1.0, (fork, top)
    finally:
        await one.unload()
        await many.unload()


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
        f"\nlate joiner: ttft {b.first * 1000:.1f} ms, done {b.end * 1000:.1f} ms; running stream: {remaining * 1000:.0f} ms left"
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


def _raw_tok_s(
    llm: Llama, contexts: dict[int, LlamaContext], prompts: list[list[int]], max_tokens: int
) -> float:
    """DESIGN §4's raw figure: one context with n_seq_max = n and a unified KV cache (kept across
    runs), one llama_decode per step for all n sequences, greedy (argmax), prefill included."""
    n, nv = len(prompts), llm.n_vocab()
    if n not in contexts:
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx, params.n_seq_max, params.kv_unified = 512 * n, n, True
        contexts[n] = LlamaContext(model=llm._model, params=params, verbose=False)
    ctx, batch = contexts[n], LlamaBatch(n_tokens=512, embd=0, n_seq_max=1)
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
    """Aggregate tok/s at batch 1/2/4/8 on SmolLM2, the engine next to the raw batched loop in the
    same run (median of 3, interleaved: this machine is shared). Printed, not asserted (DESIGN §7)."""
    threads, max_tokens = physical_cores(), 64
    texts = [f"Story number {i}: once upon a time, in a land far away," for i in range(8)]
    rounds = iter(range(1000))  # a new prompt prefix each round: no prefix reuse, like the raw loop
    llm = Llama(str(smollm2_gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    batched, single = (LlamaCppEngine(f"smol{n}", spec(smollm2_gguf, max_concurrency=n)) for n in (8, 1))
    await batched.load()
    await single.load()
    contexts: dict[int, LlamaContext] = {}

    async def tok_s(engine: LlamaCppEngine, n: int) -> float:
        start, k = time.perf_counter(), next(rounds)
        requests = [GenerationRequest(prompt=f"{k} {t}", sampling=greedy(max_tokens)) for t in texts[:n]]
        runs = await asyncio.gather(*(run(engine, r) for r in requests))
        return sum(r.done.usage.completion_tokens for r in runs) / (time.perf_counter() - start)

    try:
        print(
            f"\n{'batch':>5} {'raw tok/s':>10} {'engine tok/s':>13} {'ratio':>6}  (DESIGN: raw 135 at 1, 205 at 8)"
        )
        for n in (1, 2, 4, 8):
            prompts = [llm.tokenize(t.encode(), add_bos=True) for t in texts[:n]]
            raw, eng, one = [], [], []  # paired: each engine run next to a raw run (median of ratios)
            _raw_tok_s(llm, contexts, prompts, 8), await tok_s(batched, n)  # warm-up
            for _ in range(3):
                raw.append(_raw_tok_s(llm, contexts, prompts, max_tokens))
                eng.append(await tok_s(batched, n))
                one += [await tok_s(single, 1)] if n == 1 else []
            ratio = statistics.median(e / r for e, r in zip(eng, raw, strict=True))
            extra = f"   max_concurrency=1: {statistics.median(one):.1f} tok/s" if one else ""
            extra += (
                f" ({statistics.median(o / r for o, r in zip(one, raw, strict=True)):.2f}x)" if one else ""
            )
            print(
                f"{n:>5} {statistics.median(raw):>10.1f} {statistics.median(eng):>13.1f} {ratio:>6.2f}{extra}"
            )
    finally:
        await batched.unload()
        await single.unload()
        for ctx in contexts.values():
            ctx.close()
        llm.close()
