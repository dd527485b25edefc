"""One MLX generation, run on the engine's thread: token generator -> detokenizer -> events.

The token generators are mlx-lm's own (`generate_step`, `speculative_generate_step` for a draft
model) or ours for prompt lookup; all yield (token, logprobs, from_draft). RequestOutput turns a
request's tokens into its events (detokenizer, logprobs, the shared OutputPipeline for stop strings,
reasoning and tool calls); the batch scheduler (mlx.batch) uses it too. `cancelled` is checked
after every token, so a closed stream stops within a token or two.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step, generation_stream, speculative_generate_step, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_serve.engines.mlx.prefix_cache import PrefixCache
from mlx_serve.engines.mlx.prompt_lookup import DraftCounters, prompt_lookup_generate_step
from mlx_serve.engines.mlx.sampling import PENALTY_CONTEXT, ResolvedSampling, token_logprob
from mlx_serve.engines.speculation_gate import StepCosts
from mlx_serve.engines.text.constrained import JsonConstraint
from mlx_serve.engines.text.postprocess import OutputPipeline
from mlx_serve.engines.text.prompt_tokens import PromptTokenizer
from mlx_serve.engines.text.reasoning import ReasoningFormat
from mlx_serve.engines.text.toolcalls import ToolFormat
from mlx_serve.engines.types import Finished, FinishReason, Usage
from mlx_serve.profiles.schema import ModelSpec

log = logging.getLogger("mlx_serve.engines.mlx")
KV_REFRESH_TOKENS = 16  # how often the running request's KV size is re-measured for memory_bytes()
TokenStream = Generator[tuple[int, mx.array, bool], None, None]
Emit = Callable[[Any], None]


@dataclass
class LoadedModel:
    """Everything load() produced. Only the engine thread touches the MLX objects in it."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict[str, Any]
    weights_bytes: int
    draft_model: nn.Module | None = None
    fim_tokens: tuple[str, str, str] | None = None  # (prefix, suffix, middle) when the vocab has them
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    kv_bytes: int = 0  # KV cache of the running request, refreshed by the engine thread
    prefix: PrefixCache | None = None  # KV caches of earlier requests, for reuse (mlx.prefix_cache)
    prefix_dir: Path | None = None  # where the prefix cache is saved on unload (prefix_cache.persist)
    step_costs: StepCosts = field(default_factory=StepCosts)  # a drafted token's cost (prompt lookup)
    prompt_tokens: PromptTokenizer | None = None  # tokenizes prompts reusing earlier prompts' ids


@dataclass
class EngineCounters:
    """Plain counters for metrics and tests; written on the engine thread, read anywhere."""

    tokens_generated: int = 0  # every token the model produced, over all requests
    requests: int = 0
    batch_peak: int = 0  # the most requests ever decoding together in one batch (mlx.batch)
    load_thread: int | None = None
    generate_thread: int | None = None


@dataclass(frozen=True)
class DecodePlan:
    """One request, ready to run: the exact prompt tokens and how to turn output into events."""

    prompt_ids: tuple[int, ...]
    prompt_text: str
    sampling: ResolvedSampling
    stops: tuple[str, ...] = ()
    reasoning: ReasoningFormat | None = None
    tool_format: ToolFormat | None = None
    constraint: JsonConstraint | None = None  # response_format: masks logits to the JSON grammar


def token_stream(
    loaded: LoadedModel,
    spec: ModelSpec,
    plan: DecodePlan,
    drafts: DraftCounters,
    cache: list[Any] | None = None,
    cached: int = 0,
) -> tuple[TokenStream, list[Any]]:
    """The generator for this model's decoding mode, and the KV caches it fills.

    `cache`, when given, already holds the first `cached` prompt tokens (a prefix-cache hit): only
    the rest of the prompt is prefilled.
    """
    s = plan.sampling
    prompt = mx.array(plan.prompt_ids[cached:], mx.uint32)
    history = plan.prompt_ids[:cached]
    kv = spec.kv_cache
    quant: dict[str, Any] = {}
    if kv is not None and kv.bits is not None:
        quant = {"kv_bits": kv.bits, "kv_group_size": kv.group_size, "quantized_kv_start": kv.start}
    # The JSON constraint goes last: it must see the logits every other processor produced.
    processors = s.logits_processors() + ([plan.constraint] if plan.constraint else [])
    common: dict[str, Any] = {"max_tokens": s.max_tokens, "sampler": s.sampler(), **quant}
    speculative = spec.speculative
    if speculative is not None and speculative.prompt_lookup is not None:
        lookup = speculative.prompt_lookup
        if cache is None:
            cache = make_prompt_cache(loaded.model, max_kv_size=kv.max_size if kv else None)
        stream = prompt_lookup_generate_step(
            prompt,
            loaded.model,
            num_pred_tokens=lookup.num_pred_tokens,
            max_ngram=lookup.max_ngram,
            min_ngram=lookup.min_ngram,
            min_acceptance=lookup.min_acceptance,
            costs=loaded.step_costs,
            prompt_cache=cache,
            cached=history,
            counters=drafts,
            logits_processors=processors,
            **common,
        )
        return stream, cache
    # mlx-lm's generators show the processors only the tokens they were given.
    common["logits_processors"] = (
        [_WithHistory(processors, history)] if history and processors else processors
    )
    if loaded.draft_model is not None and speculative is not None:
        # mlx-lm needs trimmable caches here, so max_kv_size does not apply (see MLXEngine.load).
        if cache is None:
            cache = make_prompt_cache(loaded.model) + make_prompt_cache(loaded.draft_model)
        raw = speculative_generate_step(
            prompt,
            loaded.model,
            loaded.draft_model,
            num_draft_tokens=speculative.num_draft_tokens,
            prompt_cache=cache,
            **common,
        )
        return _count_drafts(raw, speculative.num_draft_tokens, s.max_tokens, drafts), cache
    if cache is None:
        cache = make_prompt_cache(loaded.model, max_kv_size=kv.max_size if kv else None)
    return _plain(generate_step(prompt, loaded.model, prompt_cache=cache, **common)), cache


class _WithHistory:
    """A request's logits processors when its first tokens came from the prefix cache: they see
    those tokens too (the penalties' window reaches back PENALTY_CONTEXT tokens), as they would
    have without the cache."""

    def __init__(self, processors: list[Any], history: Sequence[int]) -> None:
        self._processors = processors
        self._history = mx.array(history[-PENALTY_CONTEXT:], mx.uint32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        context = mx.concatenate([self._history, tokens.astype(mx.uint32)])
        for processor in self._processors:
            logits = processor(context, logits)
        return logits


def _plain(steps: Iterator[tuple[int, mx.array]]) -> TokenStream:
    try:
        for token, logprobs in steps:
            yield token, logprobs, False
    finally:
        close = getattr(steps, "close", None)
        if close:
            close()


def _count_drafts(steps: TokenStream, k: int, max_tokens: int, drafts: DraftCounters) -> TokenStream:
    """Recover drafted/accepted counts from speculative_generate_step's output.

    Each round drafts min(k, tokens left) tokens, yields the accepted ones (from_draft=True), then
    the target model's own token (from_draft=False) unless max_tokens was reached first.
    """
    produced, new_round = 0, True
    try:
        for token, logprobs, from_draft in steps:
            if new_round:
                drafts.drafted += min(k, max_tokens - produced)
                new_round = False
            if from_draft:
                drafts.accepted += 1
            else:
                new_round = True
            produced += 1
            yield token, logprobs, from_draft
    finally:
        steps.close()


class RequestOutput:
    """One request's generated tokens -> its events: EOS, streaming detokenizer, logprobs,
    OutputPipeline (stops, reasoning, tool calls), and the closing Finished with its usage.

    Shared by the single-request path (run_generation) and the batch scheduler (mlx.batch); runs on
    the engine thread. The caller counts `completion` (every token the model produced for it).
    """

    def __init__(self, loaded: LoadedModel, plan: DecodePlan, emit: Emit, cached: int = 0) -> None:
        self._plan = plan
        self._cached = cached  # prompt tokens that came from the prefix cache
        self._emit = emit
        self._tokenizer, self._lock = loaded.tokenizer, loaded.tokenizer_lock
        self._eos = loaded.tokenizer.eos_token_ids
        self._detokenizer = loaded.tokenizer.detokenizer  # a fresh copy per request
        self._pipeline = OutputPipeline(plan.stops, plan.reasoning, plan.tool_format, plan.prompt_text)
        self.completion = 0
        self.reason: FinishReason = "length"

    def feed(self, token: int, logprobs: mx.array) -> bool:
        """Turn one token into events; True when it ends the generation (EOS or a stop string)."""
        if token in self._eos:
            self.reason = "stop"
            return True
        with self._lock:  # naive detokenizers call the tokenizer, which other threads also use
            self._detokenizer.add_token(token)
        s = self._plan.sampling
        lp = (token_logprob(token, logprobs, s.top_logprobs, self._decode),) if s.logprobs else ()
        for event in self._pipeline.feed(self._detokenizer.last_segment, lp):
            self._emit(event)
        if self._pipeline.stopped:
            self.reason = "stop"
            return True
        return False

    def finish(self, drafts: DraftCounters | None = None) -> None:
        """Emit what the detokenizer and the pipeline still hold, then Finished."""
        self._detokenizer.finalize()
        for event in self._pipeline.feed(self._detokenizer.last_segment) + self._pipeline.flush():
            self._emit(event)
        if self._pipeline.tool_calls:
            self.reason = "tool_calls"
        self._emit(self._finished(self.reason, None, drafts))

    def fail(self, exc: BaseException, drafts: DraftCounters | None = None) -> None:
        """A mid-stream failure: the stream still ends with Finished (reason "error")."""
        self._emit(self._finished("error", f"{type(exc).__name__}: {exc}", drafts))

    def _decode(self, token: int) -> str:
        with self._lock:
            return self._tokenizer.decode([token])

    def _finished(self, reason: FinishReason, error: str | None, drafts: DraftCounters | None) -> Finished:
        usage = Usage(
            prompt_tokens=len(self._plan.prompt_ids),
            completion_tokens=self.completion,
            cached_prompt_tokens=self._cached,
            drafted_tokens=drafts.drafted if drafts else 0,
            accepted_draft_tokens=drafts.accepted if drafts else 0,
        )
        return Finished(reason, usage, error, stop_sequence=self._pipeline.matched_stop)


def run_generation(
    loaded: LoadedModel,
    spec: ModelSpec,
    plan: DecodePlan,
    counters: EngineCounters,
    emit: Emit,
    cancelled: threading.Event,
) -> None:
    """The producer for EngineThread.stream: emits events, the last one Finished (unless cancelled)."""
    counters.generate_thread = threading.get_ident()
    counters.requests += 1
    drafts = DraftCounters()
    if plan.sampling.seed is not None:
        mx.random.seed(plan.sampling.seed)
    prefix = loaded.prefix
    reused, cached = prefix.lookup(plan.prompt_ids) if prefix is not None else (None, 0)
    out = RequestOutput(loaded, plan, emit, cached)
    tokens: TokenStream | None = None
    generated: list[int] = []  # the KV cache holds (a prefix of) prompt + generated
    try:
        tokens, cache = token_stream(loaded, spec, plan, drafts, reused, cached)
        del reused
        with wired_limit(loaded.model, [generation_stream]):  # a no-op without Metal
            for token, logprobs, _from_draft in tokens:
                generated.append(token)
                out.completion += 1
                counters.tokens_generated += 1
                if cancelled.is_set():
                    break  # the consumer is gone: nobody to tell
                if out.completion % KV_REFRESH_TOKENS == 1:
                    loaded.kv_bytes = _cache_bytes(cache)
                if out.feed(token, logprobs):
                    break
        tokens.close()  # the generators' cleanup (speculative cache rewind) first
        loaded.kv_bytes = 0  # the running cache becomes an entry (or garbage): never counted twice
        keep_prefix(loaded, plan.prompt_ids + tuple(generated), cache)  # before Finished: counted then
        if not cancelled.is_set():
            out.finish(drafts)
    except Exception as exc:  # mid-stream failure: the stream still ends with Finished
        log.exception("generation failed")
        out.fail(exc, drafts)
    finally:
        if tokens is not None:
            tokens.close()
        loaded.kv_bytes = 0


def keep_prefix(loaded: LoadedModel, sequence: Sequence[int], cache: list[Any]) -> None:
    """Hand a finished request's KV cache to the prefix cache. A failure here costs later requests
    a cache hit, never this request its answer."""
    if loaded.prefix is None:
        return
    try:
        loaded.prefix.store(sequence, cache)
    except Exception:
        log.exception("could not keep the KV cache for reuse")


def _cache_bytes(cache: list[Any]) -> int:
    total = 0
    for c in cache:
        try:
            total += int(c.nbytes)
        except (AttributeError, NotImplementedError, TypeError):
            continue
    return total
