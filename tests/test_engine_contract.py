"""The Engine contract, one suite for both engines (parametrized over engine and model), on real
models. Engine-specific behaviour lives in test_engine_mlx.py and test_engine_llamacpp.py."""

from __future__ import annotations

import asyncio

import mlx_serve_test_raw_reference as raw
import pytest

from mlx_serve.engines.base import Engine
from mlx_serve.engines.errors import ContextOverflowError
from mlx_serve.engines.factory import create_engine
from mlx_serve.engines.types import Finished, GenerationRequest, Message, SamplingParams, TextDelta
from mlx_serve.profiles.schema import ModelSpec

CASES = [
    pytest.param(("mlx", "tiny_mlx"), id="mlx-tiny"),
    pytest.param(("llama_cpp", "tiny_gguf"), id="llamacpp-tiny"),
    pytest.param(("llama_cpp", "smollm2_gguf"), id="llamacpp-smollm2"),
    pytest.param(("mlx", "smollm2_mlx"), id="mlx-smollm2", marks=pytest.mark.slow),  # MLX CPU: ~6 tok/s
]


@pytest.fixture(params=CASES)
async def engine(request):
    kind, fixture = request.param
    path = request.getfixturevalue(fixture)
    spec = ModelSpec(source=str(path), engine=kind, context_length=1024)
    eng = create_engine(f"{kind}-{fixture}", spec, {})
    await eng.load()
    eng.is_tiny = fixture.startswith("tiny")
    eng.path, eng.context_length = path, spec.context_length
    yield eng
    await eng.unload()


def chat(text: str, **sampling) -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", text),), sampling=SamplingParams(**sampling))


async def run(engine: Engine, request: GenerationRequest) -> tuple[str, Finished]:
    text, finished = [], None
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None, "every stream ends with Finished"
    return "".join(text), finished


async def test_is_an_engine_with_info(engine) -> None:
    assert isinstance(engine, Engine)
    info = engine.info()
    assert info.context_length == 1024
    assert {"chat", "completion"} <= info.capabilities
    assert engine.memory_bytes() > 0


async def test_greedy_is_deterministic_and_usage_is_exact(engine) -> None:
    request = chat("Tell me a story.", temperature=0.0, max_tokens=12)
    first, finished = await run(engine, request)
    second, _ = await run(engine, request)
    assert first and first == second
    assert finished.usage.prompt_tokens == await engine.count_tokens(request)
    if engine.is_tiny:  # the tiny model never emits EOS: exactly max_tokens, finish "length"
        assert (finished.reason, finished.usage.completion_tokens) == ("length", 12)


async def test_stop_string_cuts_and_is_reported(engine) -> None:
    text, _ = await run(engine, chat("Tell me a story.", temperature=0.0, max_tokens=16))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut, finished = await run(engine, chat("Tell me a story.", temperature=0.0, max_tokens=16, stop=(stop,)))
    assert cut == text[: text.index(stop)]
    assert (finished.reason, finished.stop_sequence) == ("stop", stop)


async def test_seed_reproducible_at_temperature(engine) -> None:
    request = chat("Say something.", temperature=0.8, seed=7, max_tokens=10)
    assert (await run(engine, request))[0] == (await run(engine, request))[0]


async def test_logprobs(engine) -> None:
    request = chat("Hi", temperature=0.0, max_tokens=4, logprobs=True, top_logprobs=2)
    logprobs = [lp async for e in engine.generate(request) if isinstance(e, TextDelta) for lp in e.logprobs]
    assert logprobs and all(lp.logprob <= 0 for lp in logprobs)
    assert all(len(lp.top) == 2 for lp in logprobs)


async def test_context_overflow_is_a_clear_error(engine) -> None:
    with pytest.raises(ContextOverflowError, match="context length of 1024"):
        await run(engine, chat("word " * 3000, max_tokens=4))


async def test_closing_the_stream_frees_the_engine(engine) -> None:
    stream = engine.generate(chat("Tell me a long story.", temperature=0.0, max_tokens=500))
    async for event in stream:
        if isinstance(event, TextDelta):
            break
    await stream.aclose()
    text, finished = await asyncio.wait_for(
        run(engine, chat("Hi", temperature=0.0, max_tokens=3)), timeout=60
    )
    assert finished.reason in ("length", "stop")


async def test_real_model_answers_as_its_raw_engine_does(engine) -> None:
    if engine.is_tiny:
        pytest.skip("random weights")
    question = "What is the capital of France? Answer in one sentence."
    text, finished = await run(engine, chat(question, temperature=0.0, max_tokens=12))
    # The words are the CPU kernels' choice: the reference is llama.cpp or mlx-lm itself, here.
    if engine.info().engine == "llama_cpp":
        ref = raw.llama_chat(
            engine.path, raw.user(question), 12, context_length=engine.context_length, threads=None
        )
    else:
        ref = raw.mlx_greedy(engine.path, raw.user(question), 12)
    assert text == ref.text and text.strip()
    assert (finished.reason, finished.usage.completion_tokens) == (ref.finish, ref.completion_tokens)


async def test_tiny_model_is_the_same_model_on_both_engines(tiny_mlx, tiny_gguf) -> None:
    """The tiny fixtures share weights: both engines must decode the same greedy text."""
    texts = []
    for kind, path in (("mlx", tiny_mlx), ("llama_cpp", tiny_gguf)):
        eng = create_engine(kind, ModelSpec(source=str(path), engine=kind), {})
        await eng.load()
        try:
            texts.append((await run(eng, chat("Once upon a time", temperature=0.0, max_tokens=16)))[0])
        finally:
            await eng.unload()
    assert texts[0] == texts[1]
