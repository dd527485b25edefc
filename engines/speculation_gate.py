"""When to draft, and how much: a cost-aware switch for prompt-lookup speculation, one per request.

Verifying k drafted tokens costs a forward pass over k + 1 tokens. Whether that pays depends on
the acceptance rate *and* on the hardware: on Apple silicon a pass over 11 tokens costs little more
than over one (decoding is memory-bound), while on a small CPU it costs several times as much
(measured here: llama.cpp on 2 cores, SmolLM2, 8.1 ms for one token and ~65 ms for 11; MLX's CPU
backend ~160 ms for one and ~430 ms for three). So the gate weighs both, every step:

- Acceptance, per request: how often the model confirms a checked draft position, a moving
  average that starts at zero and follows the text within a few tokens. It is measured even while
  the gate drafts nothing ("shadow" checks: did the lookup's proposal foresee the token the step
  produced?), so the gate opens as soon as the text starts quoting its prompt, and novel text
  does not pay for rejected drafts to find out that it is novel.
- Cost, per loaded model (StepCosts, shared by the model's requests): what a step with k drafted
  tokens costs relative to a one-token step, from the timings of real steps.

With acceptance a, k drafts are expected to emit 1 + a + ... + a^k tokens for a step that costs
cost(k) plain steps; the gate drafts the k with the best ratio, if that promises at least MARGIN
more tokens per second than plain decoding. When the costs say drafting never pays but acceptance
is high, one token is drafted now and then so that the cost is measured again.
Pure bookkeeping, no engine imports: both engines use it and it is unit-tested alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


class StepCosts:
    """What a step with k drafted tokens costs, in one-token steps, for one loaded model: measured
    per k (the marginal cost of a token falls as batches grow: llama.cpp on 2 cores, SmolLM2, pays
    about one step for a second token but 0.7 for each of ten). Sizes not yet timed are
    interpolated between timed ones, and assumed cheap beyond the largest (PRIOR_SLOPE a token, or
    less if the timed sizes are cheaper), so a promising size is tried once and then known.
    Shared by the model's requests' gates; the engine thread alone touches it."""

    PRIOR_SLOPE = 0.25  # per drafted token, where nothing was timed: optimistic enough to try
    SMOOTHING = 0.3  # weight of the newest timing in the averages
    MAX_RELATIVE_SLOPE = 3.0  # a step slowed by something else must not rule a size out for good

    def __init__(self) -> None:
        self._plain = _Average(self.SMOOTHING)  # seconds of a one-token step
        self._relative: dict[int, _Average] = {}  # drafted tokens -> cost in one-token steps

    def add(self, inputs: int, seconds: float) -> None:
        """A step that decoded `inputs` tokens (the last one plus inputs - 1 drafts) in `seconds`."""
        if inputs <= 1:
            self._plain.add(seconds)
        elif self._plain.count and self._plain.value > 0:
            drafted = inputs - 1
            relative = min(max(seconds / self._plain.value, 1.0), 1 + self.MAX_RELATIVE_SLOPE * drafted)
            self._relative.setdefault(drafted, _Average(self.SMOOTHING)).add(relative)

    def timed(self) -> dict[int, float]:
        """The sizes timed so far: drafted tokens -> cost in one-token steps."""
        return {k: average.value for k, average in sorted(self._relative.items())}

    def relative(self, drafted: int) -> float:
        """A step with `drafted` drafts, in one-token steps."""
        known = self._relative.get(drafted)
        if known is not None:
            return known.value
        below = max((k for k in self._relative if k < drafted), default=0)
        above = min((k for k in self._relative if k > drafted), default=None)
        low = self._relative[below].value if below else 1.0
        if above is None:  # optimistic: the cheaper of the prior and what the timed sizes show
            slope = min(self.PRIOR_SLOPE, (low - 1) / below) if below else self.PRIOR_SLOPE
            return low + slope * (drafted - below)
        high = self._relative[above].value
        return low + (high - low) * (drafted - below) / (above - below)


class SpeculationGate:
    RECENT = 0.15  # weight of the newest checked position in the acceptance average
    MARGIN = 1.05  # expected tokens per second a draft must promise, relative to plain decoding
    EXPLORE_AFTER = 64  # steps without a draft before a promising request re-measures the cost
    EXPLORE_ACCEPTANCE = 0.8

    def __init__(
        self,
        min_acceptance: float,
        costs: StepCosts | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.min_acceptance = min_acceptance  # 0: no gate, always draft all the lookup proposes
        self.costs = costs if costs is not None else StepCosts()
        self._clock = clock
        self._last_step_at: float | None = None
        self.acceptance = 0.0  # moving average of confirmed (1) and rejected (0) positions
        self._since_draft = 0

    def draft_length(self, available: int) -> int:
        """How many of the `available` proposed tokens the next step should draft (0: none)."""
        if self.min_acceptance <= 0 or available <= 0:
            return max(available, 0)
        a = self.acceptance
        if a < self.min_acceptance:
            return 0
        best, best_gain = 0, self.MARGIN
        for k, expected in enumerate(expected_tokens(a, available)):
            gain = expected / self.costs.relative(k) if k else 0.0
            if gain > best_gain:
                best, best_gain = k, gain
        if best == 0 and a >= self.EXPLORE_ACCEPTANCE and self._since_draft >= self.EXPLORE_AFTER:
            return 1  # the costs may be stale (timed on a busy machine): time a draft again
        return best

    def record(self, drafted: int, accepted: int, predicted: bool | None = None, timed: bool = True) -> None:
        """One decoding step. With drafts: `drafted` verified, the first `accepted` confirmed.
        Without: `predicted` says whether the lookup's first proposed token was the one the step
        produced (None: it proposed nothing). `timed`: the step decoded this request alone, so its
        duration is what drafting costs (the batch scheduler decodes several requests per step)."""
        seconds = self._step_seconds()
        if drafted > 0:
            for confirmed in [True] * accepted + [False] * (accepted < drafted):
                self._check(confirmed)
            self._since_draft = 0
        else:
            if predicted is not None:
                self._check(predicted)
            self._since_draft += 1
        if timed and seconds is not None:
            self.costs.add(drafted + 1, seconds)

    def _check(self, confirmed: bool) -> None:
        self.acceptance += self.RECENT * (confirmed - self.acceptance)

    def _step_seconds(self) -> float | None:
        """Time since the previous step ended (None for the first: it includes the prefill)."""
        now = self._clock()
        last, self._last_step_at = self._last_step_at, now
        return None if last is None else now - last


def shadow_check(proposal: Sequence[int], draft: Sequence[int], produced: int) -> bool | None:
    """For SpeculationGate.record: when a step drafted nothing, whether the lookup's proposal
    foresaw the token the step produced (None when it drafted, or proposed nothing)."""
    return None if draft or not proposal else proposal[0] == produced


def expected_tokens(acceptance: float, most: int) -> list[float]:
    """For k = 0..most drafts: the tokens a step emits on average, each draft accepted with
    probability `acceptance` once the ones before it were (the accepted run plus the model's own
    next token): 1 + a + ... + a^k."""
    out, term = [1.0], 1.0
    for _ in range(most):
        term *= acceptance
        out.append(out[-1] + term)
    return out


class _Average:
    """An exponential moving average and how many values went into it."""

    def __init__(self, weight: float) -> None:
        self.weight, self.value, self.count = weight, 0.0, 0

    def add(self, value: float) -> None:
        self.value = value if self.count == 0 else self.weight * value + (1 - self.weight) * self.value
        self.count += 1
