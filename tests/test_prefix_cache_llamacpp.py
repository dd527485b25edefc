"""The llama.cpp prefix store (earlier prompts' KV kept in host memory beyond the slots) and the
adaptive prompt-lookup gate, on real engines and models, one-at-a-time (max_concurrency = 1) and
batched (2). The reference for every output is the same request on an engine whose prefix cache is
off; SmolLM2 checks content, the tiny random model the mechanics (fast)."""

from __future__ import annotations

import re
from pathlib import Path

import mlx_serve_test_raw_reference as raw
import numpy as np
import pytest

from mlx_serve.engines.llamacpp.engine import LlamaCppEngine
from mlx_serve.engines.llamacpp.load import kv_cache_bytes
from mlx_serve.engines.speculation_gate import StepCosts
from mlx_serve.engines.types import Finished, GenerationRequest, Message, SamplingParams, TextDelta
from mlx_serve.profiles.schema import KVCache, ModelSpec, PrefixCache, PromptLookup, Speculative

SYSTEMS = {  # different from their first word on: conversations share only the template's first tokens
    "A": "Marine biologist here. You answer questions about ocean life: whales, coral reefs, tides, "
    "plankton, deep sea fish and the currents that carry heat around the planet. Keep answers short.",
    "B": "Kitchen helper here. You answer questions about cooking: bread, soups, spices, knives, "
    "ovens, fermentation and how to keep vegetables fresh for a week or more. Keep answers short.",
    "C": "Travel guide here. You answer questions about trains, mountains, old cities, museums, "
    "maps and how to pack a small bag for a long journey through several countries. Keep answers short.",
}


def spec(path: Path, **kw) -> ModelSpec:
    return ModelSpec(source=str(path), engine="llama_cpp", context_length=1024, threads=1, **kw)


def chat(name: str, question: str = "What should I learn first?", max_tokens: int = 12) -> GenerationRequest:
    messages = (Message("system", SYSTEMS[name]), Message("user", question))
    return GenerationRequest(
        messages=messages, sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens)
    )


async def run(engine: LlamaCppEngine, request: GenerationRequest) -> tuple[str, Finished]:
    events = [e async for e in engine.generate(request)]
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def stored(engine: LlamaCppEngine) -> int:
    assert engine._model is not None and engine._model.prefixes is not None
    return engine._model.prefixes.nbytes


def kv_base(engine: LlamaCppEngine) -> int:
    assert engine._model is not None
    bits = engine.spec.kv_cache.bits if engine.spec.kv_cache else None
    return kv_cache_bytes(engine._model.header, engine._model.llm.n_ctx(), bits)


@pytest.mark.parametrize(("slots", "kv_bits"), [(1, None), (2, None), (1, 8)])
async def test_conversations_beyond_the_slots_come_back_from_the_store(
    smollm2_gguf: Path, slots: int, kv_bits: int | None
) -> None:
    """A, B, C in turn (more conversations than slots), then A again and A with a new question:
    A's KV comes back from the store, and the text is what an engine without the store writes."""
    kv = {"kv_cache": KVCache(bits=kv_bits)} if kv_bits else {}
    on = LlamaCppEngine("smol-pc", spec(smollm2_gguf, max_concurrency=slots, **kv))
    off = LlamaCppEngine(
        "smol-nopc", spec(smollm2_gguf, max_concurrency=slots, prefix_cache=PrefixCache(enabled=False), **kv)
    )
    await on.load()
    await off.load()
    try:
        for engine in (on, off):
            for name in "ABC":
                _, done = await run(engine, chat(name))
                assert done.usage.cached_prompt_tokens < 32  # only the template's first tokens in common
        assert stored(off) == 0 and off.memory_breakdown()["kv_cache"] == kv_base(off)
        assert stored(on) > 0 and on.memory_breakdown()["kv_cache"] == kv_base(on) + stored(on)
        for request in (chat("A"), chat("A", "Which animal is the largest?")):
            text, done = await run(on, request)
            ref_text, ref = await run(off, request)
            assert text == ref_text and ref.usage.cached_prompt_tokens < 32  # no slot still held A
            assert done.usage.prompt_tokens == ref.usage.prompt_tokens
            if request.messages[1].content == "What should I learn first?":
                assert done.usage.cached_prompt_tokens == done.usage.prompt_tokens - 1  # all but the last
            else:  # the system prompt and the template up to the question
                assert 40 < done.usage.cached_prompt_tokens < done.usage.prompt_tokens - 5
            for engine in (on, off):  # A out of every slot again
                await run(engine, chat("B"))
                await run(engine, chat("C"))
    finally:
        await on.unload()
        await off.unload()


async def test_short_prompts_are_not_kept(tiny_gguf: Path) -> None:
    engine = LlamaCppEngine("tiny-min", spec(tiny_gguf, prefix_cache=PrefixCache(min_tokens=64)))
    await engine.load()
    try:
        short = GenerationRequest(
            prompt="one two three four five six", sampling=SamplingParams(temperature=0, max_tokens=8)
        )
        other = GenerationRequest(
            prompt="seven eight nine ten", sampling=SamplingParams(temperature=0, max_tokens=8)
        )
        await run(engine, short)
        await run(engine, other)
        assert stored(engine) == 0  # 7 + 8 tokens held: under min_tokens, recomputing is cheaper
    finally:
        await engine.unload()


def _story(i: int) -> GenerationRequest:
    words = " ".join(f"{w}{i}" for w in ("river", "stone", "lamp", "cloud", "bread", "wheel") * 12)
    return GenerationRequest(
        prompt=f"Story {i}: {words}", sampling=SamplingParams(temperature=0, max_tokens=4)
    )


async def test_least_recently_used_out_within_max_bytes(tiny_gguf: Path) -> None:
    """Room for two entries: the third pushes out the least recently used one, and a restore
    counts as a use (a FIFO would keep the wrong one)."""
    probe = LlamaCppEngine("tiny-probe", spec(tiny_gguf))
    await probe.load()
    try:
        await run(probe, _story(0))
        await run(probe, _story(1))
        one = stored(probe)  # one entry: a story's KV state and tokens
    finally:
        await probe.unload()
    bound = 2 * one + one // 2
    engine = LlamaCppEngine("tiny-lru", spec(tiny_gguf, prefix_cache=PrefixCache(max_bytes=bound)))
    await engine.load()
    try:
        store = engine._model.prefixes

        def kept() -> list[int]:  # the story numbers held, least recently used first
            assert stored(engine) <= bound
            assert engine.memory_breakdown()["kv_cache"] == kv_base(engine) + stored(engine)
            return [_story_of(engine, e.tokens) for e in store.entries()]

        for i in range(4):  # each story offloads the one before it
            _, done = await run(engine, _story(i))
            assert done.usage.cached_prompt_tokens < 5  # "Story " in common
        assert kept() == [1, 2]  # story 0 was pushed out by story 2
        _, done = await run(engine, _story(1))  # restored (now most recently used), story 3 offloaded
        assert done.usage.cached_prompt_tokens == done.usage.prompt_tokens - 1
        assert kept() == [1, 3]  # story 2 went, not the older-inserted story 1
        _, done = await run(engine, _story(2))
        assert done.usage.cached_prompt_tokens < 5
    finally:
        await engine.unload()


def _story_of(engine: LlamaCppEngine, tokens: np.ndarray) -> int:
    text = engine._model.llm.detokenize([int(t) for t in tokens[:8]]).decode()
    match = re.search(r"Story (\d+):", text)
    assert match, text
    return int(match.group(1))


async def test_unload_clears_the_store(tiny_gguf: Path) -> None:
    engine = LlamaCppEngine("tiny-unload", spec(tiny_gguf, max_concurrency=2))
    await engine.load()
    for i in range(4):
        await run(engine, _story(i))
    store = engine._model.prefixes
    assert (
        len(store.entries()) > 0 and engine.memory_breakdown()["kv_cache"] == kv_base(engine) + store.nbytes
    )
    await engine.unload()
    assert len(store.entries()) == 0 and store.nbytes == 0
    assert engine.memory_breakdown() == {"weights": 0, "kv_cache": 0}
    await engine.load()
    try:
        _, done = await run(engine, _story(0))
        assert done.usage.cached_prompt_tokens == 0 and stored(engine) == 0  # a new, empty store
    finally:
        await engine.unload()


@pytest.mark.parametrize("slots", [1, 2])
async def test_gate_stops_drafting_on_novel_text(smollm2_gguf: Path, slots: int) -> None:
    """Prompt lookup on an answer that does not quote its prompt: most drafts are rejected. The
    gate (min_acceptance 0.3) drafts far less than always-on (0): it learns the text is novel from
    the lookup's proposals without drafting them. The text is the same as without lookup. Flash attention: without it llama.cpp's CPU attention over a multi-token batch
    (the verified draft) rounds differently from one token at a time, and greedy SmolLM2 forks."""
    request = GenerationRequest(
        messages=(Message("user", "What are the benefits of regular exercise?"),),
        sampling=SamplingParams(temperature=0.0, max_tokens=80),
    )
    results = {}
    for min_acceptance in (None, 0.0, 0.3):
        lookup = PromptLookup(max_ngram=3, num_pred_tokens=8, min_acceptance=min_acceptance or 0)
        speculative = Speculative(prompt_lookup=lookup) if min_acceptance is not None else None
        model = spec(smollm2_gguf, max_concurrency=slots, speculative=speculative, flash_attn=True)
        engine = LlamaCppEngine("smol-gate", model)
        await engine.load()
        try:
            results[min_acceptance] = await run(engine, request)
        finally:
            await engine.unload()
    (plain_text, _), (always_text, always), (gated_text, gated) = results[None], results[0.0], results[0.3]
    assert gated_text == always_text == plain_text
    assert gated.usage.completion_tokens == always.usage.completion_tokens == 80
    assert always.usage.drafted_tokens > 100
    assert always.usage.accepted_draft_tokens < 0.3 * always.usage.drafted_tokens
    assert gated.usage.drafted_tokens < always.usage.drafted_tokens / 4


async def test_gate_keeps_drafting_when_drafts_pay(
    smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text that repeats its prompt keeps the gate open: most of the drafted tokens accepted with
    the gate off are drafted with it too (it opens once a few of the lookup's proposals have come
    true, then drafts more as acceptance grows and sizes are timed).

    "When drafts pay" is made so: every step is timed as costing the same, whatever it drafted.
    Measured costs depend on the CPU (on an AVX-512 EPYC a draft of 8 costs enough that the gate
    rightly drafts less), and whether the gate's acceptance logic opens must not."""
    timed = StepCosts.add
    monkeypatch.setattr(StepCosts, "add", lambda self, inputs, seconds: timed(self, inputs, 0.01))
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa\n" * 4
    request = GenerationRequest(prompt=text, sampling=SamplingParams(temperature=0.0, max_tokens=40))
    reference = raw.llama_greedy(smollm2_gguf, text, 40, context_length=1024, flash_attn=True)
    drafted = []
    for min_acceptance in (0.0, 0.3):
        lookup = Speculative(
            prompt_lookup=PromptLookup(max_ngram=3, num_pred_tokens=8, min_acceptance=min_acceptance)
        )
        engine = LlamaCppEngine("smol-gate-echo", spec(smollm2_gguf, speculative=lookup))
        await engine.load()
        try:
            out, done = await run(engine, request)
            assert out == reference.text  # llama.cpp's own text here (prompt lookup forces flash attention)
            drafted.append((out, done.usage.drafted_tokens, done.usage.accepted_draft_tokens))
        finally:
            await engine.unload()
    (ungated_text, _, ungated_accepted), (gated_text, _, gated_accepted) = drafted
    assert gated_text == ungated_text and ungated_accepted > 20
    assert gated_accepted >= 0.6 * ungated_accepted, drafted


@pytest.mark.parametrize("slots", [1, 2])
async def test_persisted_prefixes_survive_an_unload(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slots: int
) -> None:
    """persist = true: what the store and the slots hold is written on unload and read on load, so
    the first request after a reload (or restart) reuses it; the text is unchanged."""
    monkeypatch.setenv("MLX_SERVE_HOME", str(tmp_path))
    settings = spec(smollm2_gguf, max_concurrency=slots, prefix_cache=PrefixCache(persist=True))
    engine = LlamaCppEngine("smol-persist", settings)
    await engine.load()
    try:
        first = {name: await run(engine, chat(name)) for name in "AB"}
    finally:
        await engine.unload()
    files = list((tmp_path / "cache" / "kv").glob("smol-persist-*/*.npz"))
    assert len(files) == 2, files  # A (offloaded when B took its slot, or held by a slot) and B
    engine = LlamaCppEngine("smol-persist", settings)
    await engine.load()
    try:
        assert stored(engine) > 0
        for name in "AB":
            text, done = await run(engine, chat(name))
            assert text == first[name][0]
            assert done.usage.cached_prompt_tokens >= len(SYSTEMS[name]) // 8  # most of the prompt
    finally:
        await engine.unload()
    other = LlamaCppEngine(
        "smol-persist",
        spec(
            smollm2_gguf,
            max_concurrency=slots,
            kv_cache=KVCache(bits=8),
            prefix_cache=PrefixCache(persist=True),
        ),
    )
    await other.load()  # other load settings: another folder, nothing read
    try:
        assert stored(other) == 0
    finally:
        await other.unload()
