"""Sampling settings for one MLX request: request value, else profile default, else engine default.

The sampler and logits processors are mlx-lm's own (`make_sampler`, `make_logits_processors`, and
its top-p / min-p / top-k filters in SeededSampler, for seeded requests in a batch); this module only
resolves the settings and turns a logprobs vector into TokenLogprob values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from mlx_serve.engines.types import SamplingParams, TokenLogprob
from mlx_serve.profiles.schema import Sampling

# Used when neither the request nor the profile says. 1.0 is the OpenAI and Anthropic default;
# profiles set `sampling.temperature` per model (e.g. 0 for autocomplete).
DEFAULT_TEMPERATURE = 1.0
# How many recent tokens (prompt included) the repetition/presence/frequency penalties look at.
PENALTY_CONTEXT = 64


@dataclass(frozen=True)
class ResolvedSampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    max_tokens: int
    logprobs: bool
    top_logprobs: int

    def sampler(self) -> Callable[[mx.array], mx.array]:
        return make_sampler(temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def batch_sampler(self) -> Callable[[mx.array], mx.array]:
        """The sampler for a request decoded in a batch (mlx.batch).

        Like sampler(), except with a seed: the global MLX seed that the single-request path sets
        is shared by the whole batch, so a seeded request draws from its own random key instead.
        The same seed then gives the same text whatever else is in the batch (not the same text
        as the single-request path, which draws from the global generator).
        """
        if self.seed is None or self.temperature == 0:
            return self.sampler()
        return SeededSampler(self)

    def logits_processors(self) -> list[Callable[[mx.array, mx.array], mx.array]]:
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=PENALTY_CONTEXT,
            presence_penalty=self.presence_penalty,
            presence_context_size=PENALTY_CONTEXT,
            frequency_penalty=self.frequency_penalty,
            frequency_context_size=PENALTY_CONTEXT,
        )


class SeededSampler:
    """make_sampler's chain (top-p, min-p, top-k, then temperature) drawing from a private key."""

    def __init__(self, s: ResolvedSampling) -> None:
        assert s.seed is not None and s.temperature > 0
        self._key = mx.random.key(s.seed)
        self._temperature = s.temperature
        self._filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < s.top_p < 1.0:
            self._filters.append(lambda x: apply_top_p(x, s.top_p))
        if s.min_p != 0.0:
            self._filters.append(lambda x: apply_min_p(x, s.min_p, 1))
        if s.top_k > 0:
            self._filters.append(lambda x: apply_top_k(x, s.top_k))

    def __call__(self, logprobs: mx.array) -> mx.array:
        for method in self._filters:
            logprobs = method(logprobs)
        self._key, key = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1.0 / self._temperature), key=key)


def resolve_sampling(request: SamplingParams, profile: Sampling, room: int) -> ResolvedSampling:
    """Merge request and profile settings; `room` is the context left after the prompt.

    max_tokens defaults to the profile's, else all the room left, and is capped at the room (the
    generation then ends with finish reason "length" at the end of the context).
    """

    def pick(name: str, default: float | int | None) -> float | int | None:
        value = getattr(request, name)
        if value is None:
            value = getattr(profile, name)
        return default if value is None else value

    repetition = pick("repetition_penalty", None)
    max_tokens = int(pick("max_tokens", room) or room)
    return ResolvedSampling(
        temperature=float(pick("temperature", DEFAULT_TEMPERATURE) or 0.0),
        top_p=float(pick("top_p", 1.0) or 1.0),
        top_k=int(pick("top_k", 0) or 0),
        min_p=float(pick("min_p", 0.0) or 0.0),
        repetition_penalty=None if repetition in (None, 1.0) else float(repetition),
        presence_penalty=_nonzero(pick("presence_penalty", None)),
        frequency_penalty=_nonzero(pick("frequency_penalty", None)),
        seed=request.seed,
        max_tokens=max(1, min(max_tokens, room)),
        logprobs=request.logprobs or request.top_logprobs > 0,
        top_logprobs=max(0, request.top_logprobs),
    )


def _nonzero(value: float | int | None) -> float | None:
    return None if not value else float(value)


def token_logprob(token: int, logprobs: mx.array, top: int, decode: Callable[[int], str]) -> TokenLogprob:
    """The chosen token's log-probability and the `top` most likely alternatives.

    `logprobs` is the model's normalized distribution after the logits processors and before
    temperature / top-p / top-k shaping, as mlx-lm's generators yield it.
    """
    chosen = logprobs[token].item()
    alternatives: tuple[tuple[str, float], ...] = ()
    if top > 0:
        top = min(top, logprobs.size)
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        values = logprobs[ids]
        order = mx.argsort(-values)
        ids_list, values_list = ids[order].tolist(), values[order].tolist()
        alternatives = tuple((decode(i), v) for i, v in zip(ids_list, values_list, strict=True))
    return TokenLogprob(decode(token), chosen, alternatives)
