"""When to draft: an adaptive on/off switch for speculative decoding, one per request.

Verifying k drafted tokens costs a forward pass over k + 1 tokens; when few drafts are accepted
(novel text, where prompt lookup finds only chance n-gram matches) that pass is pure overhead. The
gate watches the acceptance rate over a sliding window of recent drafts; below `min_acceptance` it
switches speculation off for a while, then probes again with a longer pause each time a probe
fails (text that starts quoting the prompt later is caught; text that never does costs almost
nothing). A probe is judged on its first verification alone: novel text drafts rarely, and waiting
for a full window of evidence after every pause would let most of its drafting through. Pure bookkeeping, no engine imports: both engines use it and it is unit-tested alone.
"""

from __future__ import annotations

from collections import deque


class SpeculationGate:
    WINDOW = 32  # drafted tokens the acceptance rate is measured over
    MIN_EVIDENCE = 12  # drafted tokens seen before the gate may close
    FIRST_PAUSE = 16  # plain-decoded tokens before the first probe
    MAX_PAUSE = 256

    def __init__(self, min_acceptance: float) -> None:
        self.min_acceptance = min_acceptance
        self._recent: deque[bool] = deque(maxlen=self.WINDOW)  # accepted? per drafted token
        self._paused_for = 0  # tokens still to decode without drafting
        self._next_pause = self.FIRST_PAUSE
        self._probing = False  # the next verification decides whether the pause ends for good

    @property
    def open(self) -> bool:
        """Whether the next step may draft."""
        return self.min_acceptance <= 0 or self._paused_for == 0

    def record(self, drafted: int, accepted: int) -> None:
        """One verification step: `drafted` tokens proposed, the first `accepted` of them kept."""
        if drafted <= 0 or self.min_acceptance <= 0:
            return
        self._recent.extend([True] * accepted + [False] * (drafted - accepted))
        if self._probing:
            self._probing = False
            if accepted / drafted < self.min_acceptance:
                self._pause()
            return
        if len(self._recent) < self.MIN_EVIDENCE:
            return
        rate = sum(self._recent) / len(self._recent)
        if rate < self.min_acceptance:
            self._pause()
        elif rate >= 2 * self.min_acceptance:
            self._next_pause = self.FIRST_PAUSE  # paying off again: forgive earlier failures

    def _pause(self) -> None:
        self._paused_for = self._next_pause
        self._next_pause = min(self._next_pause * 2, self.MAX_PAUSE)
        self._recent.clear()
        self._probing = True

    def decoded_without_draft(self, tokens: int = 1) -> None:
        """Tokens decoded one at a time while paused (or with nothing to draft) count the pause down."""
        self._paused_for = max(0, self._paused_for - tokens)
