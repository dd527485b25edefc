"""The one path every dialect uses to run a generation: lease the model, apply the profile's
sampling defaults and limits, stream engine events, report stats to observers (metrics).

`open_generation` waits for the first event before returning, so domain errors (unknown model,
context overflow, queue full) surface before a dialect has started a streaming response and can
still become a proper 4xx/5xx.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from aiohttp import web

from mlx_serve.apis.redact import redact_home
from mlx_serve.daemon.admission import INTERACTIVE, NORMAL
from mlx_serve.engines.types import (
    Event,
    Finished,
    GenerationRequest,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallEvent,
    Usage,
)

from .context import FIM_TASKS, GENERATION_OBSERVERS, REGISTRY
from .errors import RequestError

log = logging.getLogger("mlx_serve.apis")
INTERACTIVE_MAX_TOKENS = 256


@dataclass
class GenerationStats:
    dialect: str
    model_id: str
    started: float = field(default_factory=time.monotonic)
    queue_wait: float = 0.0
    load_wait: float = 0.0
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: Finished | None = None
    cancelled: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started


def apply_defaults(gen: GenerationRequest, spec, limits) -> GenerationRequest:
    """Fill unset sampling fields from the model's profile defaults and enforce the max_tokens cap."""
    sampling = gen.sampling
    updates = {}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if getattr(sampling, name) is None and getattr(spec.sampling, name) is not None:
            updates[name] = getattr(spec.sampling, name)
    max_tokens = sampling.max_tokens if sampling.max_tokens is not None else spec.sampling.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise RequestError(
            f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens"
        )
    updates["max_tokens"] = max_tokens if max_tokens is not None else limits.max_tokens
    if len(sampling.stop) > limits.max_stop_sequences:
        raise RequestError(f"at most {limits.max_stop_sequences} stop sequences are allowed", "stop")
    return dataclasses.replace(gen, sampling=dataclasses.replace(sampling, **updates))


async def open_generation(
    request: web.Request,
    dialect: str,
    model: str,
    gen: GenerationRequest,
    keep_alive: float | None | str = "default",
) -> tuple[str, AsyncIterator[Event]]:
    """(resolved model id, event stream). Raises domain errors before anything is streamed."""
    registry = request.app[REGISTRY]
    model_id = registry.resolve(model)
    if gen.suffix is not None:
        _supersede_previous_fim(request, model_id)
    stream = _generate(request, dialect, model, gen, keep_alive, registry)
    first = await stream.__anext__()
    return model_id, _chain(first, stream)


def priority_of(gen: GenerationRequest) -> int:
    """Fill-in-the-middle and short requests are interactive: they are admitted first."""
    short = gen.sampling.max_tokens is not None and gen.sampling.max_tokens <= INTERACTIVE_MAX_TOKENS
    return INTERACTIVE if gen.suffix is not None or short else NORMAL


def _supersede_previous_fim(request: web.Request, model_id: str) -> None:
    """An editor's new completion makes its previous unfinished one useless: cancel it.
    "The same client" is the same peer address, User-Agent and model."""
    tasks = request.app[FIM_TASKS]
    key = (request.remote or "", request.headers.get("User-Agent", ""), model_id)
    previous = tasks.get(key)
    if previous is not None and not previous.done():
        log.debug("a new fill-in-the-middle request supersedes the previous one for %s", model_id)
        previous.cancel()
    current = asyncio.current_task()
    if current is not None:
        tasks[key] = current
        current.add_done_callback(lambda task: tasks.pop(key, None) if tasks.get(key) is task else None)


async def _chain(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _generate(request, dialect, model, gen, keep_alive, registry) -> AsyncIterator[Event]:
    stats = GenerationStats(dialect, registry.resolve(model))
    try:
        async with registry.lease(model, keep_alive, priority_of(gen)) as lease:
            stats.queue_wait, stats.load_wait = lease.queue_wait, lease.load_wait
            gen = apply_defaults(gen, lease.spec, registry.profile.server.limits)
            events = lease.engine.generate(gen)
            try:
                async for event in events:
                    if registry.drain_expired and not isinstance(event, Finished):
                        # Shutting down and out of time: end the stream properly instead of cutting it.
                        stats.finished = Finished(
                            "length", Usage(0, len(stats.token_times)), "server shutting down"
                        )
                        log.info("ending a %s stream for %s: drain time is up", dialect, stats.model_id)
                        yield stats.finished
                        return
                    if isinstance(event, TextDelta | ReasoningDelta | ToolCallEvent):
                        if stats.first_token_at is None:
                            stats.first_token_at = event.at
                        stats.token_times.append(event.at)
                    elif isinstance(event, Finished):
                        if event.error:  # engine errors may name model files: every dialect sends them
                            event = replace(event, error=redact_home(event.error))
                        stats.finished = event
                    yield event
            finally:
                if stats.finished is None:
                    stats.cancelled = True
                await events.aclose()  # type: ignore[attr-defined]
    finally:
        for observer in request.app.get(GENERATION_OBSERVERS, []):
            try:
                observer(stats)
            except Exception:  # an observer must never break a request
                log.exception("generation observer failed")


async def embed_texts(
    request: web.Request, model: str, texts: list[str]
) -> tuple[str, list[list[float]], int]:
    """(model id, vectors, prompt token count) through a lease like any generation."""
    registry = request.app[REGISTRY]
    async with registry.lease(model) as lease:
        vectors = await lease.engine.embed(texts)
        tokens = 0
        for text in texts:
            tokens += await lease.engine.count_tokens(GenerationRequest(prompt=text))
        return lease.model_id, vectors, tokens


@dataclass(frozen=True)
class Collected:
    text: str
    reasoning: str
    tool_calls: list[ToolCallEvent]
    logprobs: list[TokenLogprob]
    finished: Finished


async def collect(events: AsyncIterator[Event]) -> Collected:
    """Drain a stream for a non-streaming response."""
    text, reasoning, calls, logprobs = [], [], [], []
    finished: Finished | None = None
    async for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
            logprobs.extend(event.logprobs)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallEvent):
            calls.append(event)
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None, "engines always end with Finished"
    return Collected("".join(text), "".join(reasoning), calls, logprobs, finished)
