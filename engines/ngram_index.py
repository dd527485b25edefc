"""Prompt-lookup drafting's source: the tokens that followed an earlier occurrence of the text's
current ending. Pure Python, used by both engines once per decoding step."""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    """Where each n-gram of a token sequence last ended, updated incrementally as tokens arrive.

    `propose(k)` looks up the sequence's own suffix n-gram (longest first) among the n-grams that
    end *before* the current end, and returns up to k tokens that followed its latest occurrence.
    Each token is indexed once, so a lookup costs O(max_ngram), not O(sequence length).
    """

    def __init__(self, min_ngram: int, max_ngram: int) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self._min, self._max = min_ngram, max_ngram
        self.tokens: list[int] = []
        self._last_end: dict[tuple[int, ...], int] = {}
        self._indexed_to = 0  # n-grams ending at positions <= this are in _last_end

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    def propose(self, k: int) -> list[int]:
        seq, length = self.tokens, len(self.tokens)
        if k <= 0 or length < 2:
            return []
        for end in range(self._indexed_to + 1, length):  # never the current end: no self-match
            for n in range(self._min, min(self._max, end) + 1):
                self._last_end[tuple(seq[end - n : end])] = end
        self._indexed_to = max(self._indexed_to, length - 1)
        for n in range(min(self._max, length - 1), self._min - 1, -1):
            end = self._last_end.get(tuple(seq[length - n :]))
            if end is not None:
                return seq[end : end + k]
        return []
