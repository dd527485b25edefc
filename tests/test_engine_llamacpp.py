"""LlamaCppEngine through its public async API, on the tiny random GGUF and the real SmolLM2.

References are llama-cpp-python called directly with the same prompt tokens and settings.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama

from mlx_serve.engines.base import Engine
from mlx_serve.engines.errors import (
    ContextOverflowError,
    EngineNotLoadedError,
    ModelLoadError,
    UnsupportedRequestError,
)
from mlx_serve.engines.llamacpp.engine import LlamaCppEngine
from mlx_serve.engines.llamacpp.load import (
    DEFAULT_MAX_CONTEXT,
    flash_attention,
    llama_kwargs,
    physical_cores,
    read_gguf_header,
)
from mlx_serve.engines.ngram_index import NgramIndex
from mlx_serve.engines.text.prompting import ChatTemplate, render_chat
from mlx_serve.engines.types import Finished, GenerationRequest, Message, SamplingParams, TextDelta
from mlx_serve.profiles.schema import KVCache, ModelSpec, PromptLookup, Speculative

# Which words SmolLM2 answers depends on the CPU's kernels (the bare question is a near-tie at the
# first token), so content is checked against llama-cpp-python itself, never against words.
CAPITAL = (Message("user", "What is the capital of France? Answer in one sentence."),)
STORY = "Once upon a time, in a small village by the sea, there lived"
REPEAT = "alpha beta gamma delta epsilon zeta eta theta iota kappa\n" * 4


def spec(path: Path, **kw) -> ModelSpec:
    return ModelSpec(source=str(path), engine="llama_cpp", **kw)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


async def run(engine: LlamaCppEngine, request: GenerationRequest) -> tuple[list, Finished]:
    events = [e async for e in engine.generate(request)]
    assert isinstance(events[-1], Finished) and not any(isinstance(e, Finished) for e in events[:-1])
    return events[:-1], events[-1]


def text_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def pieces_of(events: list) -> list[str]:
    return [lp.token for e in events if isinstance(e, TextDelta) for lp in e.logprobs]


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine("tiny", spec(tiny_gguf, context_length=512))
    asyncio.run(engine.load())
    yield engine
    asyncio.run(engine.unload())


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine("smol", spec(smollm2_gguf, context_length=512))
    asyncio.run(engine.load())
    yield engine
    asyncio.run(engine.unload())


def direct_bytes(path: Path, prompt: list[int], max_tokens: int, **kw) -> list[bytes]:
    """Greedy token pieces from llama-cpp-python's own generate(), with flash attention as the
    engine has it by default (greedy text forks between the two after a few tokens)."""
    kw.setdefault("flash_attn", flash_attention(spec(path)))
    llm = Llama(str(path), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False, **kw)
    try:
        out = []
        for token in llm.generate(prompt, temp=0.0):
            if token == llm.token_eos() or len(out) == max_tokens:
                break
            out.append(token)
        return [llm.detokenize([t]) for t in out]
    finally:
        llm.close()


def direct(path: Path, prompt: list[int], max_tokens: int, **kw) -> list[str]:
    return [p.decode("utf-8", errors="replace") for p in direct_bytes(path, prompt, max_tokens, **kw)]


def tokenize(path: Path, text: str, add_bos: bool) -> list[int]:
    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=True)
    finally:
        llm.close()


def test_engine_protocol(tiny: LlamaCppEngine) -> None:
    assert isinstance(tiny, Engine)
    info = tiny.info()
    assert info.context_length == 512 and info.engine == "llama_cpp" and info.architecture == "llama"
    assert {"chat", "completion", "tools"} <= info.capabilities and "fim" not in info.capabilities
    assert "embedding" not in info.capabilities and info.embedding_length == 64
    size = Path(tiny.spec.source).stat().st_size
    # f16 KV: 512 positions * 2 layers * 2 kv heads * (16 + 16) dims * 2 bytes
    assert tiny.memory_bytes() == size + 512 * 2 * 2 * 32 * 2


def test_llama_settings_from_the_profile(tiny_gguf: Path, smollm2_gguf: Path) -> None:
    header = read_gguf_header(tiny_gguf)
    assert header.architecture == "llama" and header.arch_value("context_length") == 2048
    default = llama_kwargs(spec(tiny_gguf), header)
    assert default["n_ctx"] == 2048  # the trained context, capped at DEFAULT_MAX_CONTEXT
    assert default["n_threads"] == default["n_threads_batch"] == physical_cores()
    # Flash attention by default only where the layers run on a GPU (this CPU build has none).
    on_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    assert default["flash_attn"] == on_gpu and "type_k" not in default and default["n_gpu_layers"] == -1
    assert llama_kwargs(spec(tiny_gguf, flash_attn=True), header)["flash_attn"]
    assert not llama_kwargs(spec(tiny_gguf, flash_attn=False), header)["flash_attn"]
    assert not llama_kwargs(spec(tiny_gguf, n_gpu_layers=0), header)["flash_attn"]
    smol = read_gguf_header(smollm2_gguf)
    assert llama_kwargs(spec(smollm2_gguf), smol)["n_ctx"] == min(8192, DEFAULT_MAX_CONTEXT)
    assert smol.quantization == "Q4_1" and 130e6 < smol.parameter_count < 140e6
    tuned = llama_kwargs(
        spec(
            tiny_gguf,
            context_length=1024,
            threads=3,
            n_gpu_layers=0,
            kv_cache=KVCache(bits=4),
            flash_attn=False,
        ),
        header,
    )
    assert tuned["n_ctx"] == 1024 and tuned["n_threads"] == 3 and tuned["n_gpu_layers"] == 0
    # A quantized V cache needs flash attention in llama.cpp, so kv bits switch it on, even over false.
    assert tuned["flash_attn"] and tuned["type_k"] == tuned["type_v"] == llama_cpp.GGML_TYPE_Q4_0
    # So does prompt lookup: drafts verified in one batch match one-at-a-time decoding only with it.
    lookup = Speculative(prompt_lookup=PromptLookup())
    assert llama_kwargs(spec(tiny_gguf, speculative=lookup, flash_attn=False), header)["flash_attn"]
    embed = llama_kwargs(spec(tiny_gguf, context_length=256, embedding=True), header)
    assert (
        embed["embedding"]
        and embed["n_batch"] == 256
        and embed["pooling_type"] == llama_cpp.LLAMA_POOLING_TYPE_MEAN
    )


async def test_tiny_greedy_matches_llama_cpp(tiny: LlamaCppEngine, tiny_gguf: Path) -> None:
    request = GenerationRequest(prompt=STORY, sampling=greedy(40, logprobs=True))
    events, done = await run(tiny, request)
    assert done.reason == "length" and done.usage.completion_tokens == 40
    expected = direct(tiny_gguf, tokenize(tiny_gguf, STORY, add_bos=True), 40)
    assert pieces_of(events) == expected
    assert text_of(events) == "".join(expected)
    # The second run reuses the cached prompt prefix and gives the same tokens.
    again, done2 = await run(tiny, request)
    assert pieces_of(again) == expected
    assert done2.usage.cached_prompt_tokens == done2.usage.prompt_tokens - 1


def _capital_prompt(engine: LlamaCppEngine) -> str:
    template = engine.info().chat_template
    assert template is not None
    return render_chat(ChatTemplate(template, "<|im_start|>", "<|im_end|>"), CAPITAL)


async def test_smollm2_greedy_matches_llama_cpp(smol: LlamaCppEngine, smollm2_gguf: Path) -> None:
    events, done = await run(smol, GenerationRequest(messages=CAPITAL, sampling=greedy(16, logprobs=True)))
    tokens = tokenize(smollm2_gguf, _capital_prompt(smol), add_bos=False)
    assert (
        done.usage.prompt_tokens
        == len(tokens)
        == await smol.count_tokens(GenerationRequest(messages=CAPITAL))
    )
    expected = direct(smollm2_gguf, tokens, 16)
    assert pieces_of(events) == expected and "".join(expected).strip()
    # llama.cpp stopped before 16 tokens only at <|im_end|>, which is not emitted
    assert done.reason == ("stop" if len(expected) < 16 else "length")
    assert done.usage.completion_tokens == len(expected) + (done.reason == "stop")
    assert "<|im_end|>" not in text_of(events)


async def test_characters_split_across_tokens_are_joined(smol: LlamaCppEngine, smollm2_gguf: Path) -> None:
    prompt = "Repeat exactly: 🙂🙂🙂 café 日本語"
    events, _ = await run(smol, GenerationRequest(prompt=prompt, sampling=greedy(16, logprobs=True)))
    pieces = direct_bytes(smollm2_gguf, tokenize(smollm2_gguf, prompt, add_bos=True), 16)
    assert pieces_of(events) == [p.decode("utf-8", errors="replace") for p in pieces]  # llama.cpp's tokens
    assert text_of(events) == b"".join(pieces).decode()  # characters split across tokens come whole
    assert "\ufffd" not in text_of(events)
    if "\ufffd" not in pieces_of(events):  # the words are the CPU's kernels' choice: maybe no emoji
        pytest.skip(f"SmolLM2 on this CPU splits no character across tokens here: {text_of(events)!r}")


async def test_prompt_lookup_gives_identical_text(
    smollm2_gguf: Path, tiny_gguf: Path, smol: LlamaCppEngine
) -> None:
    lookup = Speculative(prompt_lookup=PromptLookup(max_ngram=3, num_pred_tokens=8))
    fast = LlamaCppEngine("smol-pld", spec(smollm2_gguf, context_length=512, speculative=lookup))
    await fast.load()
    try:
        request = GenerationRequest(prompt=REPEAT, sampling=greedy(24))
        plain_events, _ = await run(smol, request)
        events, done = await run(fast, request)
        assert text_of(events) == text_of(plain_events)
        reference = direct_bytes(smollm2_gguf, tokenize(smollm2_gguf, REPEAT, add_bos=True), 24)
        assert text_of(plain_events) == b"".join(reference).decode()  # llama.cpp's own text
        assert done.usage.completion_tokens == 24
        assert (
            done.usage.drafted_tokens > 0
            and 0 < done.usage.accepted_draft_tokens <= done.usage.drafted_tokens
        )
    finally:
        await fast.unload()
    # The random tiny model drafts from n-grams of its own output; most drafts are rejected.
    tiny_fast = LlamaCppEngine("tiny-pld", spec(tiny_gguf, context_length=512, speculative=lookup))
    await tiny_fast.load()
    try:
        drafted = 0
        for prompt in ("1 2 3 4 5 6 7 8 9 10", STORY):
            events, done = await run(
                tiny_fast, GenerationRequest(prompt=prompt, sampling=greedy(100, logprobs=True))
            )
            drafted += done.usage.drafted_tokens
            assert pieces_of(events) == direct(tiny_gguf, tokenize(tiny_gguf, prompt, True), 100)
        assert drafted > 0
    finally:
        await tiny_fast.unload()


def test_ngram_index_proposes_what_followed_the_current_ending() -> None:
    def index(tokens: list[int], min_ngram: int = 1) -> NgramIndex:
        built = NgramIndex(min_ngram, 3)
        built.extend(tokens)
        return built

    history = [5, 1, 2, 3, 9, 9, 1, 2]
    assert index(history).propose(10) == [3, 9, 9, 1, 2]  # "1 2" seen before: what followed it
    assert index(history).propose(2) == [3, 9]
    assert index([1, 2, 3]).propose(5) == []
    assert index([4, 7, 4], min_ngram=2).propose(5) == []  # only a 1-gram matches
    growing = index([7, 8, 9])
    assert growing.propose(3) == []
    growing.extend([7, 8])  # indexed incrementally: the new ending is found
    assert growing.propose(3) == [9, 7, 8]


async def test_kv_cache_quantization(tiny_gguf: Path, smollm2_gguf: Path) -> None:
    smol8 = LlamaCppEngine("smol-kv8", spec(smollm2_gguf, context_length=512, kv_cache=KVCache(bits=8)))
    await smol8.load()
    try:
        events, _ = await run(smol8, GenerationRequest(messages=CAPITAL, sampling=greedy(12, logprobs=True)))
        assert text_of(events).strip()
        prompt = tokenize(smollm2_gguf, _capital_prompt(smol8), add_bos=False)
        q8 = {"type_k": llama_cpp.GGML_TYPE_Q8_0, "type_v": llama_cpp.GGML_TYPE_Q8_0, "flash_attn": True}
        assert pieces_of(events) == direct(smollm2_gguf, prompt, 12, **q8)
        # 512 positions * 30 layers * 3 kv heads * (64 + 64) dims * 34 bytes per 32 (Q8_0)
        size = smollm2_gguf.stat().st_size
        assert smol8.memory_bytes() == size + 512 * 30 * 3 * 128 * 34 // 32
    finally:
        await smol8.unload()
    # Quantized KV blocks are 32 wide; the tiny model's 16-dim heads cannot use them: a clear load error.
    with pytest.raises(ModelLoadError, match="does not divide"):
        await LlamaCppEngine("tiny-kv8", spec(tiny_gguf, kv_cache=KVCache(bits=4))).load()


async def test_stop_string_spanning_two_tokens(tiny: LlamaCppEngine) -> None:
    events, _ = await run(tiny, GenerationRequest(prompt=STORY, sampling=greedy(30, logprobs=True)))
    pieces = pieces_of(events)
    k = next(i for i in range(5, 29) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = "".join(pieces)
    expected = full[: full.index(stop)]
    events, done = await run(tiny, GenerationRequest(prompt=STORY, sampling=greedy(30, stop=("zzzz", stop))))
    assert done.reason == "stop"
    assert text_of(events) == expected


async def test_max_tokens_gives_length_with_exactly_that_many(tiny: LlamaCppEngine) -> None:
    for n in (1, 7):
        events, done = await run(tiny, GenerationRequest(prompt=STORY, sampling=greedy(n, logprobs=True)))
        assert done.reason == "length" and done.usage.completion_tokens == n and len(pieces_of(events)) == n


async def test_seed_reproducible_at_temperature(tiny: LlamaCppEngine) -> None:
    def req(seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt=STORY, sampling=SamplingParams(temperature=0.8, seed=seed, max_tokens=24)
        )

    first = text_of((await run(tiny, req(7)))[0])
    assert text_of((await run(tiny, req(7)))[0]) == first
    others = {text_of((await run(tiny, req(seed)))[0]) for seed in (8, 9)}
    assert others != {first}


async def test_logprobs(tiny: LlamaCppEngine) -> None:
    request = GenerationRequest(prompt=STORY, sampling=greedy(10, logprobs=True, top_logprobs=3))
    events, _ = await run(tiny, request)
    logprobs = [lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs]
    assert len(logprobs) == 10
    for lp in logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.top[0] == (lp.token, pytest.approx(lp.logprob))  # greedy picks the most likely token
    events, _ = await run(tiny, GenerationRequest(prompt=STORY, sampling=greedy(3)))
    assert all(not e.logprobs for e in events if isinstance(e, TextDelta))


async def test_context_overflow(tiny_gguf: Path) -> None:
    engine = LlamaCppEngine("tiny-64", spec(tiny_gguf, context_length=64))
    await engine.load()
    try:
        long = GenerationRequest(prompt=STORY * 8)
        assert await engine.count_tokens(long) > 64
        with pytest.raises(ContextOverflowError) as err:
            await anext(aiter(engine.generate(long)))
        assert err.value.context_length == 64
        # A prompt that fits generates until the context is full, then stops with "length".
        events, done = await run(engine, GenerationRequest(prompt=STORY, sampling=greedy(1000)))
        assert done.reason == "length"
        assert done.usage.prompt_tokens + done.usage.completion_tokens == 64
    finally:
        await engine.unload()


async def test_cancellation_stops_within_two_tokens(tiny: LlamaCppEngine) -> None:
    stream = tiny.generate(GenerationRequest(prompt=STORY, sampling=greedy(400)))
    start = tiny.generated_tokens
    got = [await anext(stream) for _ in range(3)]
    assert all(isinstance(e, TextDelta) for e in got)
    await stream.aclose()
    at_close = tiny.generated_tokens
    _, done = await run(tiny, GenerationRequest(prompt="Hello", sampling=greedy(5)))
    assert done.usage.completion_tokens == 5
    overrun = tiny.generated_tokens - at_close - 5
    assert 0 <= overrun <= 2, overrun
    assert tiny.generated_tokens - start < 100  # the 400-token request really stopped


async def test_generation_runs_on_engine_thread(
    tiny: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: set[str] = set()
    real = llama_cpp.llama_cpp.llama_decode

    def spy(ctx, batch):
        seen.add(threading.current_thread().name)
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_decode", spy)
    await run(tiny, GenerationRequest(prompt=STORY, sampling=greedy(5)))
    assert seen == {"llama.cpp:tiny"}


async def test_concurrent_requests(tiny: LlamaCppEngine) -> None:
    prompts = [f"{STORY} {i}" for i in range(5)]
    requests = [GenerationRequest(prompt=p, sampling=greedy(12)) for p in prompts]
    results = await asyncio.gather(*(run(tiny, r) for r in requests))
    assert all(done.reason == "length" and done.usage.completion_tokens == 12 for _, done in results)
    sequential = [text_of((await run(tiny, r))[0]) for r in requests]
    assert [text_of(events) for events, _ in results] == sequential


async def test_unsupported_requests(tiny: LlamaCppEngine) -> None:
    with pytest.raises(UnsupportedRequestError):
        await tiny.embed(["hello"])
    with pytest.raises(UnsupportedRequestError, match="fill-in-the-middle"):
        await run(tiny, GenerationRequest(prompt="def f(", suffix="return 1"))


def _bad_files(tmp: Path, tiny_gguf: Path) -> dict[str, tuple[Path, str]]:
    data = tiny_gguf.read_bytes()
    garbage = tmp / "garbage.gguf"
    garbage.write_bytes(b"\x00\x01not a model at all" * 100)
    header_cut = tmp / "header-cut.gguf"
    header_cut.write_bytes(data[:5000])
    data_cut = tmp / "data-cut.gguf"
    data_cut.write_bytes(data[: len(data) // 2])
    bad_count = tmp / "bad-count.gguf"
    bad_count.write_bytes(data[:8] + (1 << 40).to_bytes(8, "little") + data[16:])
    return {
        "garbage": (garbage, "not a GGUF file"),
        "header-cut": (header_cut, "truncated"),
        "data-cut": (data_cut, "outside the file"),
        "bad-count": (bad_count, "implausible"),
        "missing": (tmp / "missing.gguf", "does not exist"),
    }


async def test_corrupt_gguf_is_a_load_error(tmp_path: Path, tiny_gguf: Path) -> None:
    for name, (path, reason) in _bad_files(tmp_path, tiny_gguf).items():
        engine = LlamaCppEngine(f"broken-{name}", spec(path))
        with pytest.raises(ModelLoadError) as err:
            await engine.load()
        assert err.value.model_id == f"broken-{name}" and f"broken-{name}" in str(err.value)
        assert reason in err.value.reason, (name, err.value.reason)
        assert engine.memory_bytes() == 0
        await engine.unload()  # safe on a model that never loaded
    assert threading.active_count() < 20  # failed loads do not leak engine threads


async def test_unknown_architecture_is_a_load_error(tmp_path: Path, tiny_gguf: Path) -> None:
    # A valid file whose general.architecture is one llama.cpp does not know (same length as "llama").
    data = tiny_gguf.read_bytes()
    key = b"general.architecture" + (8).to_bytes(4, "little") + (5).to_bytes(8, "little")
    assert data.count(key + b"llama") == 1
    path = tmp_path / "alien.gguf"
    path.write_bytes(data.replace(key + b"llama", key + b"alien"))
    assert read_gguf_header(path).architecture == "alien"
    with pytest.raises(ModelLoadError) as err:
        await LlamaCppEngine("alien-model", spec(path)).load()
    assert "alien-model" in str(err.value) and "unknown model architecture: 'alien'" in err.value.reason
    # The process is fine and loads a good model afterwards.
    engine = LlamaCppEngine("ok", spec(tiny_gguf, context_length=128))
    await engine.load()
    _, done = await run(engine, GenerationRequest(prompt=STORY, sampling=greedy(2)))
    assert done.usage.completion_tokens == 2
    await engine.unload()
    await engine.unload()


async def test_embeddings(tmp_path: Path, tiny_gguf: Path) -> None:
    copy = tmp_path / "tiny-embed.gguf"
    shutil.copy(tiny_gguf, copy)
    engine = LlamaCppEngine("tiny-embed", spec(copy, context_length=256, embedding=True))
    await engine.load()
    try:
        assert engine.info().capabilities == frozenset({"embedding"})
        vectors = await engine.embed(["hello world", "something else entirely", "hello world"])
        assert len(vectors) == 3 and all(len(v) == 64 for v in vectors)
        assert all(np.linalg.norm(v) == pytest.approx(1.0, abs=1e-6) for v in vectors)
        assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
        assert (await engine.embed(["hello world"]))[0] == vectors[0]
        with pytest.raises(UnsupportedRequestError):
            await run(engine, GenerationRequest(prompt="hi"))
        with pytest.raises(ContextOverflowError):
            await engine.embed(["word " * 400])
    finally:
        await engine.unload()


async def test_cancelled_load_frees_the_model_and_a_new_load_works(tiny_gguf: Path) -> None:
    engine = LlamaCppEngine("tiny-cancel", spec(tiny_gguf, context_length=128))
    task = asyncio.create_task(engine.load())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.memory_bytes() == 0
    while engine._abandoned:  # the abandoned load finishes, then frees its model and thread
        await asyncio.sleep(0.01)
    await engine.load()
    _, done = await run(engine, GenerationRequest(prompt=STORY, sampling=greedy(3)))
    assert done.usage.completion_tokens == 3
    await engine.unload()
    assert engine.memory_bytes() == 0
    with pytest.raises(EngineNotLoadedError):
        engine.info()
