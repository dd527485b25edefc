"""Stop-sequence matching on a decoded text stream.

Engines decode token by token, so a stop string can arrive split over several chunks. The
matcher emits text as early as possible and holds back only the longest tail that could still
grow into a stop string; text that can no longer start a stop is never delayed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def partial_suffix_len(text: str, needles: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `needles`.

    That tail is what a streaming matcher must hold back: the next chunk may complete it.
    """
    best = 0
    for needle in needles:
        # Only lengths longer than the current best can improve it; longest first.
        for k in range(min(len(needle) - 1, len(text)), best, -1):
            if needle.startswith(text[-k:]):
                best = k
                break
    return best


class StopMatcher:
    """Incremental stop-string matcher.

    `feed(chunk)` returns (text safe to emit now, stopped). When stops overlap, the stop that
    *completes* first wins (what token-by-token generation would see); among stops completing at
    the same character the one starting earliest wins. The stop string itself is never emitted.
    Results do not depend on how the text is chunked.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        # An empty stop would match everywhere; duplicates only cost time.
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""
        self._stopped = False
        self.matched: str | None = None  # the stop string that ended generation, if any

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, chunk: str) -> tuple[str, bool]:
        if self._stopped:
            return "", True
        if not self._stops:
            return chunk, False
        # Held text contains no complete stop, so any match in `buf` ends inside `chunk`.
        buf = self._held + chunk
        hit = self._first_completed(buf)
        if hit is not None:
            start, stop = hit
            self._stopped, self.matched, self._held = True, stop, ""
            return buf[:start], True
        keep = partial_suffix_len(buf, self._stops)
        cut = len(buf) - keep
        self._held = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """Text still held back at the end of generation (it turned out not to be a stop)."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _first_completed(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])
