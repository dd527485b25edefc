"""Continuous batching for the MLX engine: the requests to one model decode in one forward pass.

Used when a model's `max_concurrency` is above 1 (see `single_request_reason` for the settings that
keep a model on the one-request-at-a-time path of mlx.generation). Built on mlx-lm's own
`BatchGenerator`, which already takes one sampler, one list of logits processors, one max_tokens
and one set of stop tokens per sequence, joins and drops sequences between steps (`insert`,
`remove`) and prefills new prompts in chunks of `prefill_step_size` tokens between decode steps.
What this module adds is the serving around it:

- Requests arrive on the event loop (`BatchScheduler.stream`) into a thread-safe queue. The first one
  starts the batch loop as ONE job on the engine thread (MLX is thread-bound, ARCHITECTURE.md "Verified facts"); it takes
  new requests from the queue between steps and returns when no request is left, so other engine
  jobs (unload, embeddings) run in between busy periods. A lock makes "queue empty, so stop" and
  "loop not running, so start it" one decision each: no request is ever stranded.
- At most `max_concurrency` requests are in the batch; later ones wait in the queue, in order.
- Each step: admit waiting requests (their prefill then advances one chunk per step, interleaved with
  the decode of the running ones, so running streams keep flowing; a chunk is sized to take about
  PREFILL_STALL seconds on this machine), drop cancelled ones (a closed
  stream leaves the batch before the next step), decode one token for every running request, and
  pass each token to its own RequestOutput (EOS, detokenizer, logprobs, stop strings, reasoning,
  tool calls, JSON constraint), which emits that request's events through its own emit.
- Per request: temperature / top-p / min-p / top-k (its sampler), penalties and the JSON constraint
  (its logits processors, guarded so that one request's failing processor fails only that request),
  seed (a private random key, see ResolvedSampling.batch_sampler), max_tokens, stop strings,
  logprobs. An error in the batched forward pass itself ends every request in the batch with
  Finished("error"); the next request starts a fresh batch.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from mlx_serve.engines.mlx.generation import (
    KV_REFRESH_TOKENS,
    DecodePlan,
    EngineCounters,
    LoadedModel,
    RequestOutput,
    keep_prefix,
)
from mlx_serve.engines.types import Event, Finished, Usage
from mlx_serve.engines.worker import EngineThread, Receiver, post_by_loop
from mlx_serve.profiles.schema import ModelSpec

log = logging.getLogger("mlx_serve.engines.mlx")
Processor = Callable[[mx.array, mx.array], mx.array]

# Prefill chunks are sized by time, not tokens: each step prefills about PREFILL_STALL seconds' worth
# of prompt (from the prefill speed measured on the previous chunks), which is the longest pause a new
# prompt puts into the running streams. A fixed token count cannot fit both Apple silicon (thousands
# of prompt tok/s) and MLX's CPU backend (SmolLM2-135M 4-bit: under 5 prompt tok/s here).
PREFILL_STALL = 0.5
PREFILL_ALONE = 2.0  # seconds per step when no stream is decoding (cancellations still seen then)
PREFILL_CHUNK = (8, 64, 4096)  # tokens per step per prompt: minimum, first guess, maximum
# Prompts prefilled together in one padded forward pass (mlx-lm's default).
PREFILL_BATCH = 8


def single_request_reason(spec: ModelSpec) -> str | None:
    """Why this model decodes one request at a time, or None when it batches."""
    if spec.embedding:
        return "embedding model"
    if spec.max_concurrency <= 1:
        return "max_concurrency is 1"
    if spec.speculative is not None:
        return "speculative decoding runs one request at a time"
    if spec.kv_cache is not None and spec.kv_cache.bits is not None:
        return "a quantized KV cache cannot be batched by mlx-lm"
    return None


def make_scheduler(
    model_id: str, loaded: LoadedModel, spec: ModelSpec, counters: EngineCounters, thread: EngineThread
) -> BatchScheduler | None:
    """The model's batch scheduler, or None when it runs one request at a time (logged if asked)."""
    reason = single_request_reason(spec)
    if reason is None:
        log.info("%s: continuous batching, up to %d requests", model_id, spec.max_concurrency)
        return BatchScheduler(loaded, spec, counters, thread)
    if spec.max_concurrency > 1:
        log.info(
            "%s: max_concurrency %d, but one request at a time: %s", model_id, spec.max_concurrency, reason
        )
    return None


@dataclass(eq=False, kw_only=True)
class _Request(Receiver):
    """One generation: its plan, and the queue on its event loop that its events go to."""

    plan: DecodePlan


def _post(posts: list[tuple[_Request, Event]]) -> None:
    post_by_loop(posts, last=lambda event: isinstance(event, Finished))


def _failed(request: _Request, exc: BaseException) -> tuple[_Request, Event]:
    """The Finished event for a request that never reached the batch."""
    usage = Usage(prompt_tokens=len(request.plan.prompt_ids), completion_tokens=0)
    return request, Finished("error", usage, f"{type(exc).__name__}: {exc}")


class _Guarded:
    """A request's logits processors: an exception marks the request failed instead of the batch."""

    def __init__(self, processors: Sequence[Processor]) -> None:
        self.processors = tuple(processors)
        self.error: Exception | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.error is None:
            try:
                for processor in self.processors:
                    logits = processor(tokens, logits)
            except Exception as exc:
                self.error = exc
        return logits


@dataclass(eq=False)
class _Running:
    """One request in the batch, on the engine thread."""

    request: _Request
    out: RequestOutput
    guard: _Guarded | None


class BatchScheduler:
    """Feeds one model's requests into a continuously batched decode loop on its engine thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        spec: ModelSpec,
        counters: EngineCounters,
        thread: EngineThread,
    ) -> None:
        self.capacity = spec.max_concurrency
        self._loaded, self._counters, self._thread = loaded, counters, thread
        self._max_kv_size = spec.kv_cache.max_size if spec.kv_cache is not None else None
        self._prefill_rate: float | None = None  # prompt tok/s measured on this model
        self._eos_stops = StopSequences([[t] for t in sorted(loaded.tokenizer.eos_token_ids)])
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()  # guarded by _lock
        self._running = False  # a loop job is queued or running on the engine thread; under _lock
        self._outbox: list[tuple[_Request, Event]] = []  # this step's events; engine thread only

    # -- the event loop's side -------------------------------------------------------------------

    async def stream(self, plan: DecodePlan) -> AsyncIterator[Event]:
        """Queue one request and yield its events, the last one Finished. Closing the iterator
        (or cancelling its consumer) takes the request out of the batch before the next step."""
        request = _Request.here(plan=plan)
        self._enqueue(request)
        try:
            while True:
                event = await request.queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            request.cancelled.set()

    def _enqueue(self, request: _Request) -> None:
        with self._lock:
            self._waiting.append(request)
            if self._running:
                return  # the loop picks it up between two steps
            self._running = True
        try:
            # A job of its own on the engine thread (EngineThread.call would need an awaiting
            # task to own the loop; the loop belongs to no request). Raises once the engine closed.
            self._thread.submit(self._run)
        except BaseException as exc:
            with self._lock:
                self._running = False
                stranded = [r for r in self._waiting if r is not request]
                self._waiting.clear()
            _post([_failed(other, exc) for other in stranded])  # queued behind a loop that never runs
            raise

    # -- the engine thread's side ----------------------------------------------------------------

    def _run(self) -> None:
        """The loop job: batches while there is work, then gives the engine thread back."""
        try:
            while True:
                self._batch()
                with self._lock:
                    if not self._waiting:
                        self._running = False
                        return
        except BaseException as exc:
            with self._lock:
                self._running = False
                stranded = list(self._waiting)
                self._waiting.clear()
            _post([_failed(request, exc) for request in stranded])
            raise

    def _batch(self) -> None:
        """One busy period: a BatchGenerator, stepped until no request is left in it."""
        gen = BatchGenerator(
            self._loaded.model,
            completion_batch_size=self.capacity,
            prefill_batch_size=min(self.capacity, PREFILL_BATCH),
            prefill_step_size=PREFILL_CHUNK[1],  # set again before every step (_chunk)
            max_kv_size=self._max_kv_size,
        )
        running: dict[int, _Running] = {}
        steps = 0
        try:
            while True:
                self._admit(gen, running)
                self._drop_cancelled(gen, running)
                if not running:
                    self._flush()  # a request that could not join was told so
                    return
                gen.prefill_step_size = self._chunk(running)
                with gen.stats() as stats:
                    _, responses = gen.next()
                if stats.prompt_tokens and stats.prompt_time > 0:
                    self._prefill_rate = stats.prompt_tokens / stats.prompt_time
                self._deliver(gen, running, responses)
                steps += 1
                if not running:  # before the last Finished goes out: memory_bytes() is idle then
                    self._loaded.kv_bytes = 0
                elif steps % KV_REFRESH_TOKENS == 1:
                    self._loaded.kv_bytes = gen.prompt_cache_nbytes
                self._flush()
        except BaseException as exc:
            log.error("batched generation failed", exc_info=exc)
            for member in running.values():
                if not member.request.cancelled.is_set():
                    member.out.fail(exc)
            self._flush()
            if not isinstance(exc, Exception):
                raise
        finally:
            gen.close()
            self._loaded.kv_bytes = 0

    def _admit(self, gen: BatchGenerator, running: dict[int, _Running]) -> None:
        """Move waiting requests into the batch, in arrival order, up to the capacity."""
        admitted: list[_Request] = []
        with self._lock:
            while self._waiting and len(running) + len(admitted) < self.capacity:
                request = self._waiting.popleft()
                if not request.cancelled.is_set():  # closed while waiting: nobody to answer
                    admitted.append(request)
        for request in admitted:
            try:
                self._insert(gen, running, request)
            except Exception as exc:  # this request cannot join (the others are unaffected)
                log.exception("could not add a request to the batch")
                self._outbox.append(_failed(request, exc))
            self._counters.requests += 1
        if admitted:
            self._counters.generate_thread = threading.get_ident()
            self._counters.batch_peak = max(self._counters.batch_peak, len(running))

    def _chunk(self, running: dict[int, _Running]) -> int:
        """Prompt tokens per prefilling request for the next step (see PREFILL_STALL)."""
        smallest, first, largest = PREFILL_CHUNK
        prefilling = sum(1 for member in running.values() if not member.out.completion)
        if self._prefill_rate is None or not prefilling:
            return first
        budget = PREFILL_ALONE if prefilling == len(running) else PREFILL_STALL
        return max(smallest, min(largest, int(budget * self._prefill_rate / prefilling)))

    def _insert(self, gen: BatchGenerator, running: dict[int, _Running], request: _Request) -> None:
        s = request.plan.sampling
        processors = s.logits_processors()
        if request.plan.constraint is not None:  # last: it masks what the others produced
            processors.append(request.plan.constraint)
        guard = _Guarded(processors) if processors else None
        ids = request.plan.prompt_ids
        prefix = self._loaded.prefix
        cache, cached = prefix.lookup(ids) if prefix is not None else (None, 0)
        (uid,) = gen.insert(
            [list(ids[cached:])],
            max_tokens=[s.max_tokens],
            caches=[cache],
            all_tokens=[list(ids[:cached])],  # what the cache holds: the processors' context
            samplers=[s.batch_sampler()],
            logits_processors=[[guard] if guard else []],
            stop_sequences=[self._eos_stops],
        )
        emit = partial(self._emit, request)
        running[uid] = _Running(request, RequestOutput(self._loaded, request.plan, emit, cached), guard)

    def _emit(self, request: _Request, event: Event) -> None:
        self._outbox.append((request, event))

    def _flush(self) -> None:
        posts, self._outbox = self._outbox, []
        if posts:
            _post(posts)

    def _drop_cancelled(self, gen: BatchGenerator, running: dict[int, _Running]) -> None:
        gone = [uid for uid, member in running.items() if member.request.cancelled.is_set()]
        if gone:
            self._keep(gen.remove(gone, return_prompt_caches=True).values())
            for uid in gone:
                del running[uid]

    def _keep(self, caches: Iterable[tuple[list[Any], list[int]]]) -> None:
        """Leaving requests' KV caches (and the tokens they hold) to the prefix cache."""
        for cache, tokens in caches:
            keep_prefix(self._loaded, tokens, cache)

    def _deliver(self, gen: BatchGenerator, running: dict[int, _Running], responses: list[Any]) -> None:
        """Each new token to its request; requests that ended leave the batch."""
        leaving: list[int] = []
        finished: list[tuple[list[Any], list[int]]] = []
        for r in responses:
            member = running.get(r.uid)
            if member is None:
                continue
            out = member.out
            out.completion += 1
            self._counters.tokens_generated += 1
            if member.request.cancelled.is_set():
                done = True  # the consumer is gone: nobody to tell
            elif member.guard is not None and member.guard.error is not None:
                out.fail(member.guard.error)
                done = True
            else:
                try:
                    done = out.feed(r.token, r.logprobs) or r.finish_reason is not None
                    if done:
                        out.finish()
                except Exception as exc:  # this request's output handling, not the batch's
                    log.exception("generation output failed")
                    out.fail(exc)
                    done = True
            if done:
                del running[r.uid]
                if r.finish_reason is None:  # BatchGenerator dropped the finished ones itself
                    leaving.append(r.uid)
                elif r.prompt_cache is not None:
                    finished.append((r.prompt_cache, r.all_tokens))
        if leaving:
            finished.extend(gen.remove(leaving, return_prompt_caches=True).values())
        self._keep(finished)
