"""The MLX prefix cache and the prompt-lookup speculation gate, with real engines and models.

Every cache hit is checked against the same request on an engine whose prefix cache is off (itself
checked token for token against mlx-lm in test_engine_mlx.py). The tiny random model carries the
mechanics; it never emits EOS, so generations run to max_tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio

from mlx_serve.engines.mlx.engine import MLXEngine
from mlx_serve.engines.mlx.prefix_cache import MIN_REUSE, PrefixCache
from mlx_serve.engines.types import Finished, GenerationRequest, Message, SamplingParams, TextDelta
from mlx_serve.profiles.schema import ModelSpec, PromptLookup, Speculative

engine_test = pytest.mark.asyncio(loop_scope="module")  # the engines are shared by the module

# About 600 tokens that several requests share, then what sets each one apart.
SHARED = "You are a careful assistant. " + " ".join(f"rule{i} applies;" for i in range(120))


@dataclass
class Result:
    text: str
    finished: Finished
    tokens: list[str]
    logprobs: list[float]

    @property
    def cached(self) -> int:
        return self.finished.usage.cached_prompt_tokens


async def run(engine: MLXEngine, request: GenerationRequest) -> Result:
    events = [event async for event in engine.generate(request)]
    assert isinstance(events[-1], Finished) and events[-1].reason != "error", events[-1]
    lps = [lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return Result(text, events[-1], [lp.token for lp in lps], [lp.logprob for lp in lps])


def raw(prompt: str, max_tokens: int = 8, **sampling: Any) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("logprobs", True)
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens, **sampling))


def chat(messages: Sequence[Message], max_tokens: int = 8) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=True)
    return GenerationRequest(messages=tuple(messages), sampling=sampling)


def assert_same(warm: Result, cold: Result, tolerance: float = 1e-3) -> None:
    """The same greedy output, token for token (logprobs up to float noise of a split prefill)."""
    assert warm.tokens == cold.tokens and warm.text == cold.text
    assert warm.logprobs == pytest.approx(cold.logprobs, abs=tolerance)
    assert warm.finished.reason == cold.finished.reason
    assert warm.finished.usage.prompt_tokens == cold.finished.usage.prompt_tokens
    assert warm.finished.usage.completion_tokens == cold.finished.usage.completion_tokens


def prefix_of(engine: MLXEngine) -> PrefixCache:
    prefix = engine.prefix_cache
    assert prefix is not None
    return prefix


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cold(make_mlx_engine: Any, tiny_mlx: Path) -> MLXEngine:
    """The reference: prefix cache off."""
    return await make_mlx_engine("tiny-cold", source=str(tiny_mlx), prefix_cache={"enabled": False})


# -- hits give the same output ---------------------------------------------------------------


@engine_test
async def test_shared_prefix_is_reused_and_output_unchanged(
    make_mlx_engine: Any, cold: MLXEngine, tiny_mlx: Path
) -> None:
    warm = await make_mlx_engine("tiny-warm", source=str(tiny_mlx))
    first = await run(warm, raw(SHARED + " Question one: what now?", 30))
    second = await run(warm, raw(SHARED + " Question two: and then?", 30))
    assert first.cached == 0 and first.finished.usage.prompt_tokens > 500
    assert second.cached >= first.finished.usage.prompt_tokens - 10  # all but the differing tail
    assert second.cached < second.finished.usage.prompt_tokens
    assert_same(second, await run(cold, raw(SHARED + " Question two: and then?", 30)))
    assert cold.prefix_cache is None and cold.memory_breakdown()["kv_cache"] == 0
    # The same prompt again: everything but its last token comes from the cache.
    again = await run(warm, raw(SHARED + " Question two: and then?", 30))
    assert again.cached == again.finished.usage.prompt_tokens - 1
    assert_same(again, second)


@engine_test
async def test_penalties_see_the_cached_tokens(make_mlx_engine: Any, cold: MLXEngine, tiny_mlx: Path) -> None:
    """A repeated prompt prefills one token: the penalty window must still reach into the cache."""
    warm = await make_mlx_engine("tiny-warm-penalty", source=str(tiny_mlx), prefix_cache={"enabled": True})
    # The model's own greedy text at the end of the prompt: what it would say next is in the window.
    echo = (await run(cold, raw(SHARED, 40))).text
    request = raw(SHARED + echo, 40, repetition_penalty=1.5)
    await run(warm, request)
    again = await run(warm, request)
    assert again.cached == again.finished.usage.prompt_tokens - 1
    reference = await run(cold, request)
    assert reference.text != (await run(cold, raw(SHARED + echo, 40))).text  # the penalty matters
    assert_same(again, reference)


@engine_test
async def test_chat_turns_hit_and_alternating_conversations_both_stay_cached(
    make_mlx_engine: Any, cold: MLXEngine, tiny_mlx: Path
) -> None:
    warm = await make_mlx_engine("tiny-chat", source=str(tiny_mlx))
    talks = {
        name: [
            Message("system", f"{SHARED} You talk about {name}."),
            Message("user", f"Tell me about {name}."),
        ]
        for name in ("boats", "trains")
    }
    previous: dict[str, int] = {}
    for turn in range(3):
        for name, messages in talks.items():  # boats, trains, boats, trains, ...
            result = await run(warm, chat(messages))
            if turn == 0:
                assert result.cached == 0 or name == "trains"  # trains shares the system prompt's start
            else:  # the whole previous turn (its prompt and its reply) came from the cache
                assert result.cached >= previous[name] - 2
                assert_same(result, await run(cold, chat(messages)))
            previous[name] = result.finished.usage.prompt_tokens
            messages += [
                Message("assistant", result.text),
                Message("user", f"More about {name}, turn {turn}."),
            ]
    assert len(prefix_of(warm)) >= 2  # one entry per conversation (each turn's replaced the last)


@engine_test
async def test_batched_requests_reuse_and_fill_the_cache(
    make_mlx_engine: Any, cold: MLXEngine, tiny_mlx: Path
) -> None:
    batched = await make_mlx_engine("tiny-batched-prefix", source=str(tiny_mlx), max_concurrency=4)
    first = await run(batched, raw(SHARED + " Batch question zero?", 20))
    assert first.cached == 0 and len(prefix_of(batched)) == 1  # kept when it left the batch
    requests = [raw(SHARED + f" Batch question {i}?", 20 + i) for i in range(1, 4)]
    requests.append(raw("Nothing in common with the others. " * 20, 25))  # a miss in the same batch
    together = await asyncio.gather(*(run(batched, r) for r in requests))
    assert batched.counters.batch_peak >= 2
    for result in together[:3]:
        assert result.cached >= first.finished.usage.prompt_tokens - 10
    assert together[3].cached == 0
    for result, request in zip(together, requests, strict=True):
        assert_same(result, await run(cold, request))


# -- bounds, eviction, lifecycle -------------------------------------------------------------


@engine_test
async def test_lru_eviction_keeps_bytes_under_the_bound(
    make_mlx_engine: Any, cold: MLXEngine, tiny_mlx: Path
) -> None:
    def prompt(name: str) -> str:  # about 100 tokens, different from the first token on
        return f"{name}: " + " ".join(f"{name}{i}" for i in range(30))

    probe = await make_mlx_engine("tiny-probe", source=str(tiny_mlx))
    await run(probe, raw(prompt("alpha")))
    entry = prefix_of(probe).nbytes  # one such request's KV cache (all of them have the same size)
    assert entry > 0
    bound = int(2.5 * entry)  # room for two entries, not three
    small = await make_mlx_engine("tiny-small", source=str(tiny_mlx), prefix_cache={"max_bytes": bound})
    prefix = prefix_of(small)

    async def step(name: str) -> Result:
        result = await run(small, raw(prompt(name)))
        assert prefix.nbytes <= bound
        assert small.memory_breakdown()["kv_cache"] == prefix.nbytes
        return result

    await step("alpha")
    await step("beta")
    assert len(prefix) == 2 and prefix.nbytes == 2 * entry
    assert (await step("alpha")).cached > 0  # a hit, and alpha is now the most recently used
    await step("gamma")  # evicts beta, the least recently used
    assert len(prefix) == 2
    beta = await step("beta")
    assert beta.cached == 0  # evicted
    assert_same(beta, await run(cold, raw(prompt("beta"))))
    assert (await step("gamma")).cached > 0
    # An entry larger than the whole bound is never kept (nor does it evict the others).
    await run(small, raw("delta " * 700))
    assert len(prefix) == 2 and prefix.nbytes <= bound


@engine_test
async def test_short_prompts_are_not_kept(make_mlx_engine: Any, tiny_mlx: Path) -> None:
    engine = await make_mlx_engine("tiny-min", source=str(tiny_mlx), prefix_cache={"min_tokens": 64})
    await run(engine, raw("Short one", 8))  # prompt + output well under 64 tokens
    assert len(prefix_of(engine)) == 0 and engine.memory_breakdown()["kv_cache"] == 0
    await run(engine, raw(SHARED, 8))
    assert len(prefix_of(engine)) == 1
    # What a kept entry shares with a new prompt is reused however short (a template's system
    # prompt): min_tokens bounds what is kept, not what is reused.
    other = await run(engine, raw(SHARED[:40] + " and now for something else entirely", 8))
    assert MIN_REUSE <= other.finished.usage.cached_prompt_tokens < 64


@engine_test
async def test_unload_frees_the_prefix_cache(tiny_mlx: Path) -> None:
    engine = MLXEngine("tiny-unload-prefix", ModelSpec(engine="mlx", source=str(tiny_mlx)))
    await engine.load()
    await run(engine, raw(SHARED))
    prefix = prefix_of(engine)
    assert len(prefix) == 1 and engine.memory_breakdown()["kv_cache"] == prefix.nbytes > 0
    await engine.unload()
    assert len(prefix) == 0 and prefix.nbytes == 0
    assert engine.memory_breakdown() == {"weights": 0, "kv_cache": 0}
    await engine.load()
    assert (await run(engine, raw(SHARED))).cached == 0  # a fresh model starts cold
    await engine.unload()


@engine_test
async def test_persisted_prefixes_survive_a_reload(
    cold: MLXEngine, tiny_mlx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLX_SERVE_HOME", str(tmp_path))
    spec = ModelSpec(engine="mlx", source=str(tiny_mlx), prefix_cache={"persist": True})
    first = MLXEngine("tiny-persist", spec)
    await first.load()
    await run(first, raw(SHARED + " Before the restart.", 10))
    await first.unload()
    files = list((tmp_path / "cache" / "kv").glob("tiny-persist-*/*.safetensors"))
    assert len(files) == 1
    second = MLXEngine("tiny-persist", spec)  # a new engine, as after a daemon restart
    await second.load()
    try:
        assert len(prefix_of(second)) == 1
        after = await run(second, raw(SHARED + " After the restart.", 10))
        assert after.cached > 500
        assert_same(after, await run(cold, raw(SHARED + " After the restart.", 10)))
    finally:
        await second.unload()
    other = MLXEngine("tiny-persist", spec.model_copy(update={"context_length": 1024}))
    await other.load()  # other settings: another folder, nothing read
    try:
        assert len(prefix_of(other)) == 0
    finally:
        await other.unload()


# -- other decoding modes --------------------------------------------------------------------


@engine_test
async def test_prompt_lookup_and_draft_model_reuse_the_prefix(
    make_mlx_engine: Any, cold: MLXEngine, tiny_mlx: Path
) -> None:
    lookup = await make_mlx_engine(
        "tiny-lookup-prefix", source=str(tiny_mlx), speculative=Speculative(prompt_lookup=PromptLookup())
    )
    draft = await make_mlx_engine(
        "tiny-draft-prefix",
        draft=("d", ModelSpec(engine="mlx", source=str(tiny_mlx))),
        source=str(tiny_mlx),
        speculative=Speculative(draft_model="d"),
    )
    for engine in (lookup, draft):
        await run(engine, raw(SHARED + " First.", 30))
        second = await run(engine, raw(SHARED + " Second.", 30))
        assert second.cached > 500
        assert_same(second, await run(cold, raw(SHARED + " Second.", 30)))


@engine_test
async def test_quantized_kv_cache_prefixes_are_reused(
    make_mlx_engine: Any, tiny_mlx: Path, tmp_path: Path
) -> None:
    # The tiny weights read as 2 heads of 32: a head size that KV quantization's group size divides.
    folder = tmp_path / "tiny-head32"
    folder.mkdir()
    config = json.loads((tiny_mlx / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps(config | {"num_attention_heads": 2, "num_key_value_heads": 1})
    )
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).symlink_to(tiny_mlx / name)
    kv = {"bits": 4, "group_size": 32, "start": 0}
    warm = await make_mlx_engine("tiny-kv4-warm", source=str(folder), kv_cache=kv)
    cold = await make_mlx_engine(
        "tiny-kv4-cold", source=str(folder), kv_cache=kv, prefix_cache={"enabled": False}
    )
    await run(warm, raw(SHARED + " First.", 20))
    second = await run(warm, raw(SHARED + " Second.", 20))
    assert second.cached > 500
    # A split prefill attends to the prefix already quantized, a whole one to it in full precision
    # (the same text here, logprobs a few thousandths apart).
    assert_same(second, await run(cold, raw(SHARED + " Second.", 20)), tolerance=1e-2)


@engine_test
async def test_speculation_gate_stops_drafting_on_novel_text(
    make_mlx_engine: Any, cold: MLXEngine, tiny_mlx: Path
) -> None:
    """The random model's text seldom repeats its prompt: drafts (chance 1-gram matches) are mostly
    rejected, so the gate keeps closing for longer and longer pauses; the output is the same as
    without speculation. (Over 800 tokens the gate drafts about a third of what ungated lookup does;
    the pauses double, so the share falls as the generation grows.)"""
    story = (
        "Once upon a time there was a lighthouse keeper who lived alone on a rock far out at sea. "
        "Every night he climbed the stairs, lit the lamp and watched the ships pass by. "
    ) * 3
    request = raw(story, 800, logprobs=False)
    always = await make_mlx_engine(
        "tiny-ungated",
        source=str(tiny_mlx),
        speculative=Speculative(prompt_lookup=PromptLookup(min_ngram=1, min_acceptance=0)),
    )
    gated = await make_mlx_engine(
        "tiny-gated",
        source=str(tiny_mlx),
        speculative=Speculative(prompt_lookup=PromptLookup(min_ngram=1, min_acceptance=0.3)),
    )
    plain, ungated, with_gate = [await run(e, request) for e in (cold, always, gated)]
    ungated_usage, gated_usage = ungated.finished.usage, with_gate.finished.usage
    assert ungated_usage.drafted_tokens > 200
    assert ungated_usage.accepted_draft_tokens < 0.3 * ungated_usage.drafted_tokens  # really novel
    assert gated_usage.drafted_tokens < ungated_usage.drafted_tokens / 2, (gated_usage, ungated_usage)
    assert ungated.text == plain.text and with_gate.text == plain.text
    # While the gate drafts nothing, each plain step is queued before the previous one is read;
    # logits processors see the same tokens there (a repetition penalty changes this text).
    penalized, unpenalized = (raw(story, 200, logprobs=False, repetition_penalty=p) for p in (1.3, 1.0))
    expected = (await run(cold, penalized)).text
    assert (await run(gated, penalized)).text == expected != (await run(cold, unpenalized)).text


# -- through the daemon ----------------------------------------------------------------------


def test_openai_usage_reports_cached_tokens_on_the_second_turn(start_daemon: Any, tiny_mlx: Path) -> None:
    daemon = start_daemon({"tiny-mlx": {"source": str(tiny_mlx), "engine": "mlx"}})
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0, timeout=300)
    messages: list[Any] = [
        {"role": "system", "content": SHARED},
        {"role": "user", "content": "Hello there."},
    ]
    first = client.chat.completions.create(model="tiny-mlx", messages=messages, max_tokens=5, temperature=0)
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And again?"},
    ]
    second = client.chat.completions.create(model="tiny-mlx", messages=messages, max_tokens=5, temperature=0)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2
