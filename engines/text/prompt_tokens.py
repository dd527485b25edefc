"""Prompt tokenization that reuses the token ids of earlier prompts.

Chat clients resend the whole conversation every turn, and agents a system prompt of tens of
thousands of tokens: tokenizing a 42,000-token conversation takes ~100 ms with SmolLM2's Hugging
Face tokenizer and ~250 ms with llama.cpp's (on the engine thread, where it holds up every stream),
on every request, even when the prefix cache makes the prefill itself nearly free.

Both tokenizers split the text at special tokens (<|im_start|>, <|im_end|>, ...) before
tokenizing the pieces between them, each on its own. So if a new prompt and a remembered one share
their text up to and including some special token, the ids before that token are the same in both,
and only the text from that token on is tokenized again. Whitespace a special token absorbs
(lstrip/rstrip) is absorbed the same way: the reused ids end before the token, the fresh ones
start with it.

A remembered prompt is used only where its special tokens line up with its ids: the k-th special
string in its text must be the k-th special id in its ids, or none of it is reused. Prompts
tokenized with the tokenizer's own additions (a BOS it adds) are tokenized whole, as are short ones.
One caller at a time (the engines call it under their tokenizer lock or on their thread).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_CHARS = 4096  # shorter prompts tokenize in a millisecond or two: not worth remembering
ENTRIES = 8  # remembered prompts (recent first); a conversation or two per client


@dataclass(frozen=True)
class _Remembered:
    text: str
    ids: np.ndarray
    ends: list[int]  # char offset just after each special token, in order
    starts: list[int]  # char offset of each special token
    positions: list[int]  # index of each special token's id in `ids`


class PromptTokenizer:
    def __init__(self, encode: Callable[[str], list[int]], specials: Mapping[str, int]) -> None:
        """`encode`: text -> ids, special tokens parsed, nothing added; `specials`: the special
        tokens' text -> id."""
        self._encode = encode
        self._ids = dict(specials)
        names = sorted(self._ids, key=len, reverse=True)  # the longest match first, as tokenizers do
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None
        self._special_ids = np.array(sorted(set(self._ids.values())), dtype=np.int64)
        self._remembered: list[_Remembered] = []

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, as `encode` would give them."""
        if self._pattern is None or len(text) < MIN_CHARS:
            return self._encode(text)
        head, start = self._reusable(text)
        ids = head + self._encode(text[start:]) if start else self._encode(text)
        self._remember(text, ids)
        return ids

    def _reusable(self, text: str) -> tuple[list[int], int]:
        """(ids, char offset): the ids of text[:offset] from the remembered prompt sharing the most
        text, offset being the start of the last special token both share whole; ([], 0) if none."""
        best, best_common = None, 0
        for entry in self._remembered:
            common = _common_prefix(entry.text, text)
            if common > best_common:
                best, best_common = entry, common
        if best is None:
            return [], 0
        k = bisect.bisect_right(best.ends, best_common) - 1  # the last special token inside both
        if k < 0:
            return [], 0
        self._remembered.remove(best)
        self._remembered.insert(0, best)
        return best.ids[: best.positions[k]].tolist(), best.starts[k]

    def _remember(self, text: str, ids: list[int]) -> None:
        assert self._pattern is not None
        array = np.asarray(ids, dtype=np.int64)
        positions = np.flatnonzero(np.isin(array, self._special_ids)).tolist()
        matches = list(self._pattern.finditer(text))
        if len(matches) != len(positions) or any(
            ids[p] != self._ids[m.group()] for m, p in zip(matches, positions, strict=True)
        ):
            return  # the special strings and ids do not line up: never reuse this one
        entry = _Remembered(text, array, [m.end() for m in matches], [m.start() for m in matches], positions)
        self._remembered = [e for e in self._remembered if not text.startswith(e.text)]
        self._remembered.insert(0, entry)
        del self._remembered[ENTRIES:]


def hf_special_tokens(tokenizer: Any) -> dict[str, int]:
    """A Hugging Face tokenizer's special tokens (text -> id); {} if it does not list them."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {token.content: i for i, token in added.items() if getattr(token, "special", False)}


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings: binary search over C-speed slice compares."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high:  # a[:low] == b[:low]; the answer lies in [low, high]
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low
