"""The MLX engine through its public async API, with real models, checked against mlx-lm itself.

The tiny random model (never emits EOS, ~500 tok/s) carries the mechanics; the real SmolLM2
(~6 tok/s on these CPUs) keeps max_tokens small and checks content. References are computed with
mlx-lm directly, on the test's own thread, from independently built prompts (Hugging Face's
chat-template rendering, not ours).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
import pytest_asyncio
from mlx_lm.sample_utils import make_logits_processors

from mlx_serve.engines.base import Engine
from mlx_serve.engines.errors import (
    ContextOverflowError,
    EngineNotLoadedError,
    ModelLoadError,
    UnsupportedRequestError,
)
from mlx_serve.engines.mlx.engine import MLXEngine
from mlx_serve.engines.mlx.sampling import PENALTY_CONTEXT
from mlx_serve.engines.types import (
    Finished,
    GenerationRequest,
    Message,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolSpec,
)
from mlx_serve.profiles.schema import KVCache, ModelSpec, PromptLookup, Speculative

pytestmark = pytest.mark.asyncio(loop_scope="module")

CAPITAL = (Message("user", "What is the capital of France?"),)
STORY = (Message("user", "Tell me a short story about a lighthouse keeper."),)
# Repeats itself, so n-gram lookups find candidates in the prompt.
REPEATING = "one two three four five six seven eight nine ten. " * 6 + "one two three"


# -- helpers ---------------------------------------------------------------------------------


@dataclass
class Result:
    text: str
    finished: Finished
    logprobs: list[TokenLogprob]

    @property
    def tokens(self) -> list[str]:
        return [lp.token for lp in self.logprobs]


async def run(engine: MLXEngine, request: GenerationRequest) -> Result:
    events = [event async for event in engine.generate(request)]
    assert isinstance(events[-1], Finished) and not any(isinstance(e, Finished) for e in events[:-1])
    deltas = [e for e in events if isinstance(e, TextDelta)]
    logprobs = [lp for d in deltas for lp in d.logprobs]
    return Result("".join(d.text for d in deltas), events[-1], logprobs)


def chat(messages: Sequence[Message] = STORY, **sampling: Any) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(messages=tuple(messages), sampling=SamplingParams(**sampling))


def raw(prompt: str, **sampling: Any) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(**sampling))


_reference_models: dict[str, tuple[Any, Any]] = {}


def reference_model(folder: Path) -> tuple[Any, Any]:
    if str(folder) not in _reference_models:
        _reference_models[str(folder)] = mlx_lm.load(str(folder))
    return _reference_models[str(folder)]


@dataclass
class Reference:
    text: str
    tokens: list[str]  # decoded one by one, EOS excluded
    count: int  # tokens generated, EOS included (as the engine's usage counts it)
    finish: str


def mlx_lm_reference(
    folder: Path, prompt: Sequence[Message] | str, max_tokens: int, **kwargs: Any
) -> Reference:
    """Greedy decoding straight through mlx_lm.stream_generate."""
    model, tokenizer = reference_model(folder)
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        ids = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in prompt], add_generation_prompt=True
        )
    responses = list(mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, **kwargs))
    tokens = [r.token for r in responses]
    return Reference(
        text="".join(r.text for r in responses),
        tokens=[tokenizer.decode([t]) for t in tokens if t not in tokenizer.eos_token_ids],
        count=len(tokens),
        finish=responses[-1].finish_reason or "",
    )


def assert_matches(result: Result, ref: Reference) -> None:
    assert result.tokens == ref.tokens  # token for token
    assert result.text == ref.text
    assert result.finished.usage.completion_tokens == ref.count
    assert result.finished.reason == ref.finish


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny(make_mlx_engine: Any, tiny_mlx: Path) -> MLXEngine:
    return await make_mlx_engine("tiny", source=str(tiny_mlx))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smollm2(make_mlx_engine: Any, smollm2_mlx: Path) -> MLXEngine:
    return await make_mlx_engine("smollm2", source=str(smollm2_mlx))


@pytest.fixture(scope="module")
def tiny_head32(tiny_mlx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny weights read as 2 heads of 32 (1 KV head): the same tensor shapes, and a head
    size that KV quantization's group sizes (32, 64, 128) divide; the tiny model's 16 does not."""
    folder = tmp_path_factory.mktemp("tiny-head32")
    config = json.loads((tiny_mlx / "config.json").read_text())
    config |= {"num_attention_heads": 2, "num_key_value_heads": 1}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).symlink_to(tiny_mlx / name)
    return folder


FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


@pytest.fixture(scope="module")
def tiny_fim(tiny_mlx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with three unused special tokens renamed to StarCoder's FIM tokens."""
    folder = tmp_path_factory.mktemp("tiny-fim")
    renames = dict(zip(("<jupyter_output>", "<jupyter_script>", "<empty_output>"), FIM_TOKENS, strict=True))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (tiny_mlx / name).read_text()
        for old, new in renames.items():
            text = text.replace(f'"{old}"', f'"{new}"')
        (folder / name).write_text(text)
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(tiny_mlx / name)
    return folder


# -- greedy equivalence with mlx-lm ----------------------------------------------------------


async def test_tiny_greedy_matches_mlx_lm(tiny: MLXEngine, tiny_mlx: Path) -> None:
    result = await run(tiny, chat(max_tokens=40, logprobs=True))
    assert_matches(result, mlx_lm_reference(tiny_mlx, STORY, 40))
    assert result.finished.reason == "length" and len(result.tokens) == 40


async def test_smollm2_answers_token_for_token_like_mlx_lm(smollm2: MLXEngine, smollm2_mlx: Path) -> None:
    # The words are the CPU kernels' choice (SmolLM2 has near-ties): mlx-lm here is the reference.
    result = await run(smollm2, chat(CAPITAL, max_tokens=10, logprobs=True))
    assert_matches(result, mlx_lm_reference(smollm2_mlx, CAPITAL, 10))
    assert result.text.strip()


@pytest.mark.parametrize(("bits", "start"), [(8, 0), (4, 16)])
async def test_kv_quantized_matches_mlx_lm(
    make_mlx_engine: Any, tiny_head32: Path, bits: int, start: int
) -> None:
    kv = KVCache(bits=bits, group_size=32, start=start)
    engine = await make_mlx_engine(f"tiny-kv{bits}", source=str(tiny_head32), kv_cache=kv)
    result = await run(engine, chat(max_tokens=40, logprobs=True))
    ref = mlx_lm_reference(tiny_head32, STORY, 40, kv_bits=bits, kv_group_size=32, quantized_kv_start=start)
    assert_matches(result, ref)
    if bits == 4:  # the comparison can tell: 4-bit KV changes this model's output
        assert ref.text != mlx_lm_reference(tiny_head32, STORY, 40).text


@pytest.mark.slow
async def test_smollm2_kv_quantized_matches_mlx_lm(make_mlx_engine: Any, smollm2_mlx: Path) -> None:
    kv = KVCache(bits=8, group_size=64, start=0)
    engine = await make_mlx_engine("smollm2-kv8", source=str(smollm2_mlx), kv_cache=kv)
    result = await run(engine, chat(CAPITAL, max_tokens=8, logprobs=True))
    ref = mlx_lm_reference(smollm2_mlx, CAPITAL, 8, kv_bits=8, kv_group_size=64, quantized_kv_start=0)
    assert_matches(result, ref)


async def test_kv_group_size_that_does_not_divide_head_size_fails_to_load(tiny_mlx: Path) -> None:
    spec = ModelSpec(source=str(tiny_mlx), engine="mlx", kv_cache=KVCache(bits=4, group_size=32))
    with pytest.raises(ModelLoadError, match=r"'tiny-kv'.*group_size 32.*head size 16"):
        await MLXEngine("tiny-kv", spec).load()


# -- speculative decoding --------------------------------------------------------------------


@pytest.mark.parametrize("repetition_penalty", [None, 1.3])
async def test_prompt_lookup_gives_the_same_text_and_accepts_drafts(
    make_mlx_engine: Any, tiny: MLXEngine, tiny_mlx: Path, repetition_penalty: float | None
) -> None:
    lookup = Speculative(prompt_lookup=PromptLookup(max_ngram=3, min_ngram=1, num_pred_tokens=5))
    engine = await make_mlx_engine(
        f"tiny-lookup-{repetition_penalty}", source=str(tiny_mlx), speculative=lookup
    )
    # Random weights rarely repeat themselves; over 300 tokens a few drafts do get accepted.
    request = raw(REPEATING, max_tokens=300, logprobs=True, repetition_penalty=repetition_penalty)
    plain, looked_up = await run(tiny, request), await run(engine, request)
    assert looked_up.text == plain.text and looked_up.tokens == plain.tokens
    usage = looked_up.finished.usage
    assert usage.completion_tokens == 300 and looked_up.finished.reason == "length"
    assert 0 < usage.accepted_draft_tokens <= usage.drafted_tokens
    assert plain.finished.usage.drafted_tokens == 0


@pytest.mark.slow
async def test_smollm2_prompt_lookup_accepts_copied_text(make_mlx_engine: Any, smollm2_mlx: Path) -> None:
    # Ungated: whether drafting pays on this machine's CPU is the gate's business, tested apart.
    lookup = Speculative(prompt_lookup=PromptLookup(min_acceptance=0))
    engine = await make_mlx_engine("smollm2-lookup", source=str(smollm2_mlx), speculative=lookup)
    prompt = "The quick brown fox jumps over the lazy dog. " * 4 + "The quick brown"
    result = await run(engine, raw(prompt, max_tokens=10))
    assert result.text == mlx_lm_reference(smollm2_mlx, prompt, 10).text
    assert result.finished.usage.accepted_draft_tokens >= 5


async def test_draft_model_speculative_decoding_matches_greedy(make_mlx_engine: Any, tiny_mlx: Path) -> None:
    draft = ("tiny-draft", ModelSpec(source=str(tiny_mlx), engine="mlx"))
    spec = Speculative(draft_model="tiny-draft", num_draft_tokens=3)
    engine = await make_mlx_engine("tiny-main", draft=draft, source=str(tiny_mlx), speculative=spec)
    result = await run(engine, chat(max_tokens=40, logprobs=True))
    assert_matches(result, mlx_lm_reference(tiny_mlx, STORY, 40))
    usage = result.finished.usage
    # A model drafting for a copy of itself is always right: 10 rounds of 3 drafts + 1 own token.
    assert usage.drafted_tokens == 30 and usage.accepted_draft_tokens == 30
    assert engine.memory_bytes() >= 2 * 6_000_000 * 4  # both models' weights (~6.4M float32 each)


# -- sampling and output handling ------------------------------------------------------------


async def test_stop_string_spanning_two_tokens(tiny: MLXEngine) -> None:
    full = await run(tiny, chat(max_tokens=30, logprobs=True))
    for i in range(3, 25):  # a stop made of the end of token i and the start of token i+1
        left, right = full.tokens[i].strip(), full.tokens[i + 1].strip()
        if len(left) < 2 or len(right) < 2:
            continue
        stop = full.tokens[i][-2:] + full.tokens[i + 1][:2]
        boundary = len("".join(full.tokens[: i + 1]))
        if full.text.find(stop) == boundary - 2:  # its first occurrence is the one across the boundary
            break
    else:
        pytest.fail("no token pair to build a spanning stop string from")
    result = await run(tiny, chat(max_tokens=30, stop=(stop,)))
    assert result.finished.reason == "stop"
    assert result.text == full.text[: boundary - 2]  # nothing of the stop string is emitted
    assert result.finished.usage.completion_tokens == i + 2  # generation stopped right there


async def test_penalties_use_mlx_lm_logits_processors(tiny: MLXEngine, tiny_mlx: Path) -> None:
    penalties = {"repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    result = await run(tiny, chat(max_tokens=40, logprobs=True, **penalties))
    sizes = {f"{name.split('_')[0]}_context_size": PENALTY_CONTEXT for name in penalties}
    processors = make_logits_processors(**penalties, **sizes)
    assert_matches(result, mlx_lm_reference(tiny_mlx, STORY, 40, logits_processors=processors))
    plain = await run(tiny, chat(max_tokens=40, logprobs=True))  # the penalties did reshape the logits
    assert [lp.logprob for lp in result.logprobs] != [lp.logprob for lp in plain.logprobs]


@pytest.mark.parametrize("max_tokens", [1, 7])
async def test_max_tokens_ends_with_length(tiny: MLXEngine, max_tokens: int) -> None:
    result = await run(tiny, raw("Once upon a time", max_tokens=max_tokens, logprobs=True))
    assert result.finished.reason == "length"
    assert result.finished.usage.completion_tokens == max_tokens == len(result.tokens)
    assert result.finished.usage.prompt_tokens == await tiny.count_tokens(raw("Once upon a time"))


async def test_seed_makes_sampling_reproducible(tiny: MLXEngine) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return chat(max_tokens=30, temperature=0.8, seed=seed)

    first = await run(tiny, sampled(1234))
    await run(tiny, chat(max_tokens=5, temperature=0.8))  # an unseeded request in between
    again = await run(tiny, sampled(1234))
    other = await run(tiny, sampled(4321))
    greedy = await run(tiny, chat(max_tokens=30))
    assert first.text == again.text
    assert other.text != first.text
    assert first.text != greedy.text  # temperature 0.8 really sampled


async def test_logprobs_are_log_probabilities_with_sorted_alternatives(tiny: MLXEngine) -> None:
    result = await run(tiny, chat(max_tokens=12, logprobs=True, top_logprobs=3))
    assert len(result.logprobs) == 12
    for lp in result.logprobs:
        assert lp.logprob <= 0.0
        assert len(lp.top) == 3
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert lp.top[0] == (lp.token, pytest.approx(lp.logprob))  # greedy picks the most likely token
    without = await run(tiny, chat(max_tokens=12))
    assert without.logprobs == [] and without.text == result.text


async def test_tools_reach_the_prompt(tiny: MLXEngine) -> None:
    weather = ToolSpec("get_weather", "Weather for a city", {"type": "object", "properties": {}})
    plain = await tiny.count_tokens(chat(CAPITAL))
    with_tools = GenerationRequest(messages=CAPITAL, tools=(weather,))
    assert await tiny.count_tokens(with_tools) > plain
    none = GenerationRequest(messages=CAPITAL, tools=(weather,), tool_choice="none")
    assert await tiny.count_tokens(none) == plain


# -- errors ----------------------------------------------------------------------------------


async def test_prompt_over_the_context_raises_before_any_event(make_mlx_engine: Any, tiny_mlx: Path) -> None:
    engine = await make_mlx_engine("tiny-ctx64", source=str(tiny_mlx), context_length=64)
    assert engine.info().context_length == 64
    long = raw("word " * 100)
    with pytest.raises(ContextOverflowError) as caught:
        await engine.generate(long).__anext__()
    assert caught.value.prompt_tokens == await engine.count_tokens(long) and caught.value.context_length == 64
    # 63 prompt tokens leave room for exactly one: max_tokens is capped there, not an error
    fits = raw("word " * 62 + "word", max_tokens=50)
    assert await engine.count_tokens(fits) == 63
    result = await run(engine, fits)
    assert result.finished.reason == "length" and result.finished.usage.completion_tokens == 1
    with pytest.raises(ContextOverflowError):
        await engine.generate(raw("word " * 63 + "word")).__anext__()


async def test_fim_on_a_model_without_fim_tokens_is_unsupported(tiny: MLXEngine) -> None:
    assert "fim" not in tiny.info().capabilities and tiny.info().fim_tokens is None
    request = GenerationRequest(
        prompt="def add(a, b):\n    ", suffix="\n", sampling=SamplingParams(max_tokens=4)
    )
    with pytest.raises(UnsupportedRequestError, match="fill-in-the-middle"):
        await tiny.generate(request).__anext__()


async def test_fim_prompt_is_built_from_the_vocabulary_fim_tokens(
    make_mlx_engine: Any, tiny_fim: Path
) -> None:
    engine = await make_mlx_engine("tiny-fim", source=str(tiny_fim))
    assert "fim" in engine.info().capabilities and engine.info().fim_tokens == FIM_TOKENS
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    request = GenerationRequest(
        prompt=prefix, suffix=suffix, sampling=SamplingParams(temperature=0.0, max_tokens=12, logprobs=True)
    )
    fim_text = f"{FIM_TOKENS[0]}{prefix}{FIM_TOKENS[1]}{suffix}{FIM_TOKENS[2]}"
    ids = reference_model(tiny_fim)[1].encode(fim_text)
    assert ids[0] == 14 and ids[-1] == 16  # the FIM markers are single special tokens
    assert await engine.count_tokens(request) == len(ids)
    assert_matches(await run(engine, request), mlx_lm_reference(tiny_fim, fim_text, 12))


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing", "architecture"])
async def test_broken_model_folder_gives_load_error_naming_the_model(
    tiny_mlx: Path, tmp_path: Path, damage: str
) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_mlx, folder)
    weights = folder / "model.safetensors"
    if damage == "corrupt":
        weights.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100_000])
    elif damage == "missing":
        weights.unlink()
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"model_type": "no-such-arch"}))
    engine = MLXEngine("broken-model", ModelSpec(source=str(folder), engine="mlx"))
    with pytest.raises(ModelLoadError) as caught:
        await engine.load()
    assert caught.value.model_id == "broken-model" and "'broken-model'" in str(caught.value)
    expected = {
        "corrupt": "corrupt",
        "truncated": "corrupt",
        "missing": "missing",
        "architecture": "unsupported",
    }
    assert caught.value.reason.startswith(expected[damage])
    with pytest.raises(EngineNotLoadedError):
        engine.info()


# -- threads, concurrency, cancellation ------------------------------------------------------


async def test_load_and_generation_run_on_the_engine_thread(tiny: MLXEngine) -> None:
    assert isinstance(tiny, Engine)
    await run(tiny, raw("Hello", max_tokens=2))
    ident = tiny.thread_ident
    assert ident is not None and ident != threading.get_ident()
    assert tiny.counters.load_thread == ident == tiny.counters.generate_thread


async def test_concurrent_requests_all_complete(tiny: MLXEngine) -> None:
    requests = [chat(max_tokens=20) if i % 2 else raw(f"Request {i}", max_tokens=15) for i in range(8)]
    results = await asyncio.gather(*(run(tiny, r) for r in requests))
    assert all(r.finished.reason == "length" for r in results)
    assert {r.text for r in results[1::2]} == {results[1].text}  # same request, same greedy output
    assert [r.finished.usage.completion_tokens for r in results] == [15, 20] * 4
    assert tiny.counters.batch_peak == 0  # max_concurrency 1: one at a time, never batched (mlx.batch)


@pytest.mark.parametrize("how", ["aclose", "cancel task"])
async def test_closing_the_stream_stops_generation(tiny: MLXEngine, how: str) -> None:
    stream = tiny.generate(raw("Keep going", max_tokens=1500))
    produced_at_close = 0
    three_seen = asyncio.Event()

    async def consume() -> None:
        nonlocal produced_at_close
        seen = 0
        async for _ in stream:  # a task cancelled here is inside the stream's __anext__
            seen += 1
            if seen == 3:
                three_seen.set()
                if how == "aclose":
                    produced_at_close = tiny.counters.tokens_generated
                    await stream.aclose()
                    return

    task = asyncio.create_task(consume())
    await three_seen.wait()
    if how == "cancel task":
        produced_at_close = tiny.counters.tokens_generated
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    after = await run(tiny, raw("Next", max_tokens=5))  # queued behind the cancelled job
    assert after.finished.reason == "length"
    extra = tiny.counters.tokens_generated - produced_at_close - after.finished.usage.completion_tokens
    assert 0 <= extra <= 2, f"{extra} tokens generated after the stream was closed"


async def test_memory_counts_weights_the_running_kv_cache_and_kept_prefixes(tiny: MLXEngine) -> None:
    prefix = tiny.prefix_cache
    assert prefix is not None
    idle = tiny.memory_breakdown()
    assert idle["weights"] >= 6_000_000 * 4  # ~6.4M float32 parameters
    assert idle["kv_cache"] == prefix.nbytes  # what earlier tests left in the prefix cache
    running = 0
    async for event in tiny.generate(raw("Memory of a prompt nobody sent before", max_tokens=40)):
        if not isinstance(event, Finished):
            running = max(running, tiny.memory_breakdown()["kv_cache"] - idle["kv_cache"])
    after = tiny.memory_breakdown()
    assert running > 0 and after["weights"] == idle["weights"]
    # The request's KV cache (over min_tokens) was kept for reuse: counted once, as a prefix.
    assert after["kv_cache"] == prefix.nbytes > idle["kv_cache"]


async def test_unload_frees_and_generate_then_fails(tiny_mlx: Path) -> None:
    engine = MLXEngine("tiny-unload", ModelSpec(source=str(tiny_mlx), engine="mlx"))
    await engine.load()
    thread = engine.thread_ident
    assert engine.memory_bytes() > 0
    await engine.unload()
    await engine.unload()  # safe twice
    assert engine.memory_bytes() == 0 and engine.thread_ident is None
    assert not any(t.ident == thread for t in threading.enumerate())
    with pytest.raises(EngineNotLoadedError):
        await engine.generate(raw("Hello")).__anext__()
    await engine.load()  # and it loads again
    assert (await run(engine, raw("Hello", max_tokens=3))).finished.usage.completion_tokens == 3
    await engine.unload()


# -- embeddings ------------------------------------------------------------------------------


async def test_embeddings_are_normalized_and_deterministic(
    make_mlx_engine: Any, tiny: MLXEngine, tiny_mlx: Path
) -> None:
    embedder = await make_mlx_engine("tiny-embed", source=str(tiny_mlx), embedding=True)
    assert embedder.info().capabilities == frozenset({"embedding"})
    vectors = await embedder.embed(["hello world", "a lighthouse keeper", "hello world"])
    assert len(vectors) == 3 and all(len(v) == 64 for v in vectors)
    norms = [float(mx.linalg.norm(mx.array(v)).item()) for v in vectors]
    assert norms == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    with pytest.raises(UnsupportedRequestError):
        await tiny.embed(["not an embedding model"])
    with pytest.raises(UnsupportedRequestError):
        await embedder.generate(raw("embedding models do not generate")).__anext__()
