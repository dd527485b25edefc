"""When to draft: an adaptive on/off switch for speculative decoding, one per request.

Verifying k drafted tokens costs a forward pass over k + 1 tokens. Whether that pays depends on
the acceptance rate *and* on the hardware: on Apple silicon a pass over 11 tokens costs little more
than over one (decoding is memory-bound), while on a small CPU it costs several times as much
(measured here: llama.cpp on 2 cores decodes SmolLM2 at 8.1 ms a token and prefills at 5.9 ms a
token, so even drafts that are all accepted gain at most 1.4x). So the gate judges drafting by
what it delivers: it times every step itself (the engines call it once per step) and compares the
seconds per emitted token of drafting steps against plain steps. Drafting pauses when it is slower,
or when fewer than `min_acceptance` of the drafts are accepted; after a pause it probes again, with
a longer pause each time a probe fails (text that starts quoting the prompt later is caught; text
that never does costs almost nothing). A probe is judged on its first verification alone: novel
text drafts rarely, and waiting for a full window of evidence would let most of its drafting
through. The draft length adapts too: it starts short, doubles while every draft is accepted and
drops to what was accepted (plus one) on a miss, so a chance match costs one short verification. Pure bookkeeping, no engine imports: both engines use it and it is unit-tested alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class SpeculationGate:
    WINDOW = 32  # drafted tokens the acceptance rate is measured over
    MIN_EVIDENCE = 3  # verifications seen before the gate may close on acceptance (drafts are short)
    MIN_TIMED = 3  # steps of each kind timed before the gate compares their speed
    SMOOTHING = 0.3  # weight of the newest step in the seconds-per-token averages
    FIRST_PAUSE = 16  # plain-decoded tokens before the first probe
    MAX_PAUSE = 256
    FIRST_DRAFT = 2  # tokens drafted before any has been accepted

    def __init__(self, min_acceptance: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.min_acceptance = min_acceptance
        self._clock = clock
        self._last_step_at: float | None = None
        self._recent: deque[bool] = deque(maxlen=self.WINDOW)  # accepted? per drafted token
        self._paused_for = 0  # tokens still to decode without drafting
        self._next_pause = self.FIRST_PAUSE
        self._probing = False  # the next verification decides whether the pause ends for good
        self._draft_length = self.FIRST_DRAFT
        self._verifications = 0  # since the start or the last pause
        self._draft_spt = _Average(self.SMOOTHING)  # seconds per emitted token, drafting steps
        self._plain_spt = _Average(self.SMOOTHING)  # the same for plain steps

    @property
    def open(self) -> bool:
        """Whether the next step may draft."""
        return self.min_acceptance <= 0 or self._paused_for == 0

    def draft_length(self, most: int) -> int:
        """How many tokens the next step should draft, at most `most` (the profile's num_pred_tokens)."""
        return most if self.min_acceptance <= 0 else max(1, min(most, self._draft_length))

    def record(self, drafted: int, accepted: int) -> None:
        """One verification step: `drafted` tokens proposed, the first `accepted` of them kept."""
        seconds = self._step_seconds()
        if drafted <= 0 or self.min_acceptance <= 0:
            return
        if seconds is not None:
            self._draft_spt.add(seconds / (accepted + 1))
        self._draft_length = 2 * drafted if accepted == drafted else accepted + 1
        self._recent.extend([True] * accepted + [False] * (drafted - accepted))
        self._verifications += 1
        if self._probing:
            self._probing = False
            if accepted / drafted < self.min_acceptance or self._slower_than_plain():
                self._pause()
            return
        if self._slower_than_plain():
            self._pause()
            return
        if self._verifications < self.MIN_EVIDENCE:
            return
        rate = sum(self._recent) / len(self._recent)
        if rate < self.min_acceptance:
            self._pause()
        elif rate >= 2 * self.min_acceptance:
            self._next_pause = self.FIRST_PAUSE  # paying off again: forgive earlier failures

    def decoded_without_draft(self, tokens: int = 1) -> None:
        """Tokens decoded one at a time while paused (or with nothing to draft) count the pause down."""
        seconds = self._step_seconds()
        if seconds is not None and tokens > 0:
            self._plain_spt.add(seconds / tokens)
        self._paused_for = max(0, self._paused_for - tokens)

    def _step_seconds(self) -> float | None:
        """Time since the previous step ended (None for the first: it includes the prefill)."""
        now = self._clock()
        last, self._last_step_at = self._last_step_at, now
        return None if last is None else now - last

    def _slower_than_plain(self) -> bool:
        draft, plain = self._draft_spt, self._plain_spt
        if draft.count < self.MIN_TIMED or plain.count < self.MIN_TIMED:
            return False
        return draft.value > plain.value

    def _pause(self) -> None:
        self._paused_for = self._next_pause
        self._next_pause = min(self._next_pause * 2, self.MAX_PAUSE)
        self._recent.clear()
        self._verifications = 0
        self._probing = True


class _Average:
    """An exponential moving average and how many values went into it."""

    def __init__(self, weight: float) -> None:
        self.weight, self.value, self.count = weight, 0.0, 0

    def add(self, value: float) -> None:
        self.value = value if self.count == 0 else self.weight * value + (1 - self.weight) * self.value
        self.count += 1
