"""Prompt-lookup speculative decoding for MLX models.

Drafts come for free from the text itself: the longest n-gram (max_ngram down to min_ngram) that
ends the sequence and occurred earlier in prompt + output proposes the tokens that followed it
there. The model checks the last accepted token plus all drafted tokens in ONE forward pass over
the KV cache; the drafts are accepted up to the first position where the model's own choice
(greedy or sampled, after the same logits processors) differs, and that choice is emitted too. The
cache entries of rejected drafts are trimmed. Every emitted token is one the model itself chose
given the same prefix, so greedy output is identical to plain decoding (up to the floating-point
differences of a multi-token forward pass, the same caveat as mlx-lm's draft-model decoding).

While the request's SpeculationGate rules drafting out, each plain step is submitted before the
previous one is read (mlx-lm's generate_step pipelines the same way), so a paused gate costs plain
decoding nothing.

`prompt_lookup_generate_step` mirrors mlx-lm's `speculative_generate_step`: it yields
`(token, logprobs, from_draft)` and must run on the thread that owns the model (ARCHITECTURE.md "Verified facts").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, maybe_quantize_kv_cache
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from mlx_serve.engines.ngram_index import NgramIndex
from mlx_serve.engines.speculation_gate import SpeculationGate, StepCosts, shadow_check

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class DraftCounters:
    """Speculative-decoding bookkeeping for one request: tokens proposed and tokens kept."""

    drafted: int = 0
    accepted: int = 0


def _draft_room(cache: list[Any], wanted: int) -> int:
    """How many drafts the cache can take and still be trimmed back afterwards."""
    if not can_trim_prompt_cache(cache):
        return 0  # e.g. recurrent-state caches: fall back to plain one-token steps
    room = wanted
    for c in cache:
        max_size = getattr(c, "max_size", None)  # RotatingKVCache: trimmable only until it wraps
        if max_size is not None:
            room = min(room, max_size - c.offset - 2)
    return max(room, 0)


def prompt_lookup_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    num_pred_tokens: int = 10,
    max_ngram: int = 3,
    min_ngram: int = 1,
    min_acceptance: float = 0.0,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: list[Any] | None = None,
    cached: Sequence[int] = (),
    prefill_step_size: int = 2048,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    counters: DraftCounters | None = None,
    costs: StepCosts | None = None,
    stream: Any = generation_stream,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield (token, logprobs over the vocabulary, from_draft) until max_tokens (-1: no limit).

    `cached`: the tokens `prompt_cache` already holds, before `prompt` (a prefix-cache hit); they
    are looked up for drafts and shown to the logits processors like the rest of the prompt.
    `min_acceptance`: the request's SpeculationGate threshold (0: always draft all proposed);
    `costs`: the model's measured cost of a drafted token, shared by its requests' gates.
    """
    sampler = sampler or greedy_sampler
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    counters = counters if counters is not None else DraftCounters()
    quantize = functools.partial(
        maybe_quantize_kv_cache,
        quantized_kv_start=quantized_kv_start,
        kv_group_size=kv_group_size,
        kv_bits=kv_bits,
    )
    index = NgramIndex(min_ngram, max_ngram)
    index.extend([*cached, *prompt.tolist()])
    gate = SpeculationGate(min_acceptance, costs)

    def verify(inputs: mx.array, seen: mx.array | None) -> tuple[mx.array, mx.array]:
        """Sampled token and logprobs at every input position, from one forward pass."""
        logits = model(inputs[None], cache=cache)[0]
        quantize(cache)
        if not logits_processors:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), logprobs
        rows, picks = [], []
        for i in range(inputs.size):  # processors see the tokens up to and including position i
            row = logits[i : i + 1]
            context = mx.concatenate([seen, inputs[: i + 1]]) if seen is not None else inputs[: i + 1]
            for processor in logits_processors:
                row = processor(context, row)
            row = row - mx.logsumexp(row, keepdims=True)
            picks.append(sampler(row))
            rows.append(row)
        return mx.concatenate(picks), mx.concatenate(rows)

    with mx.stream(stream):
        y = prompt.astype(mx.uint32)
        while y.size > 1:  # prefill all but the last prompt token, in chunks, like generate_step
            n = min(prefill_step_size, y.size - 1)
            model(y[:n][None], cache=cache)
            quantize(cache)
            mx.eval([c.state for c in cache])
            y = y[n:]
            mx.clear_cache()
        seen = None  # the tokens in the cache, for the logits processors
        if logits_processors:
            seen = mx.concatenate([mx.array(cached, mx.uint32), prompt[:-1].astype(mx.uint32)])
        produced = 0
        queued = None  # (picks, logprobs) of the next plain step, already submitted
        while max_tokens < 0 or produced < max_tokens:
            left = num_pred_tokens if max_tokens < 0 else min(num_pred_tokens, max_tokens - produced)
            proposal = index.propose(_draft_room(cache, left))  # needs y's value: known by now
            if queued is not None:  # plain step queued before the lookup could propose
                draft, inputs, (picks, logprobs) = [], y, queued
                queued = None
            else:
                draft = proposal[: gate.draft_length(len(proposal))]
                inputs = mx.concatenate([y, mx.array(draft, mx.uint32)]) if draft else y
                picks, logprobs = verify(inputs, seen)
            if (
                not draft
                and gate.draft_length(num_pred_tokens) == 0
                and (max_tokens < 0 or produced + 1 < max_tokens)
            ):
                # The next step cannot draft whatever is proposed: queue it now, on this step's lazy
                # token, so the model computes while we wait (as generate_step does): drafting
                # that pauses costs plain decoding nothing.
                queued = verify(picks[:1], None if seen is None else mx.concatenate([seen, inputs[:1]]))
                mx.async_eval(*queued)
            mx.eval(picks, logprobs)
            chosen = picks.tolist()
            accepted = 0
            while accepted < len(draft) and chosen[accepted] == draft[accepted]:
                accepted += 1
            trim_prompt_cache(cache, len(draft) - accepted)  # the cache now ends at the last kept input
            counters.drafted += len(draft)
            counters.accepted += accepted
            gate.record(len(draft), accepted, shadow_check(proposal, draft, chosen[0]))
            emitted = [*draft[:accepted], chosen[accepted]]
            if max_tokens >= 0:
                emitted = emitted[: max_tokens - produced]
            index.extend(emitted)
            if seen is not None:
                seen = mx.concatenate([seen, inputs[: accepted + 1]])
            y = mx.array([chosen[accepted]], mx.uint32)
            for i, token in enumerate(emitted):
                produced += 1
                yield token, logprobs[i], i < accepted
            if produced % 256 < len(emitted):
                mx.clear_cache()
