"""The MLX prefix cache: KV caches of recent prompts (and their continuations), reused across requests.

A new request starts from the stored entry sharing the longest token prefix with its prompt: a copy
of that entry cut to the shared length, so only the rest of the prompt is prefilled. Entries are
keyed by exactly the tokens their KV cache holds and are never written after they are stored (a
copy is a view whose first write reallocates, see `_view`), so the requests that reuse an entry,
one after another or together in a batch, cannot corrupt it. Several entries per model, least
recently used out first, bounded in bytes (the caches' own nbytes, allocation padding included).

Engine thread only (ARCHITECTURE.md "Verified facts"), except `nbytes`, which memory_breakdown() reads from anywhere.

Why not mlx-lm's own `LRUPromptCache` (mlx_lm.models.cache): it deep-copies the whole entry on
every hit, returns an empty remainder on an exact hit (generate_step needs at least one token), has
no minimum length, and its trie and per-role LRUs solve problems we do not have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from mlx_serve.profiles.schema import ModelSpec

log = logging.getLogger("mlx_serve.engines.mlx")
MAX_ENTRIES = 256  # a lookup scans every entry; tiny models could otherwise keep thousands
# A kept entry (at least min_tokens long) is reused for whatever it shares with a new prompt: a view
# costs nothing, so even a chat template's short default system prompt is not computed again
# (SmolLM2's: ~20 tokens, half of a short chat prompt). A token or two (BOS) is not worth it.
MIN_REUSE = 4


@dataclass(eq=False)
class _Entry:
    tokens: np.ndarray  # exactly the tokens the cache holds
    cache: list[Any]
    nbytes: int


class PrefixCache:
    """One model's cached prefixes, least recently used first."""

    def __init__(self, max_bytes: int, min_tokens: int) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = max(1, min_tokens)
        self.nbytes = 0  # the stored entries' bytes; never above max_bytes
        self._entries: list[_Entry] = []
        self._closed = False  # cleared for unload: a request still finishing stores nothing

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """(a fresh KV cache holding the longest stored prefix of `prompt`, its length), or
        (None, 0). The prefix stops before the prompt's last token: decoding needs one input."""
        if not self._entries or len(prompt) < 2:
            return None, 0
        ids = np.asarray(prompt[:-1], dtype=np.int64)
        best, best_len = None, 0
        for entry in self._entries:
            n = _common_prefix(entry.tokens, ids)
            if n > best_len:
                best, best_len = entry, n
        if best is None or best_len < MIN_REUSE:
            return None, 0
        self._touch(best)
        return [view(c, best_len) for c in best.cache], best_len

    def store(self, tokens: Sequence[int], cache: list[Any]) -> bool:
        """Keep `cache` for reuse, keyed by the first tokens of `tokens` it holds (any KV beyond
        them is trimmed). The caller must not use `cache` afterwards. True when it was kept."""
        n = min(len(tokens), _held(cache))
        if self._closed or n < self.min_tokens or not storable(cache):
            return False
        for c in cache:
            c.trim(c.offset - n)
        ids = np.asarray(tokens[:n], dtype=np.int64)
        for entry in list(self._entries):
            common = _common_prefix(entry.tokens, ids)
            if common == len(ids):  # an entry already holds all of this (and maybe more)
                self._touch(entry)
                return False
            if common == len(entry.tokens):  # this one holds all of that entry: it is redundant
                self._remove(entry)
        mx.eval([c.state for c in cache])  # lazy slices would keep a whole batch's KV alive
        size = sum(int(c.nbytes) for c in cache)
        if size > self.max_bytes:
            return False
        while self._entries and (self.nbytes + size > self.max_bytes or len(self._entries) >= MAX_ENTRIES):
            self._remove(self._entries[0])
        self._entries.append(_Entry(ids, cache, size))
        self.nbytes += size
        return True

    def entries(self) -> list[tuple[list[int], list[Any]]]:
        """(tokens, KV cache) of every entry, least recently used first; the caches must not be
        written (see `view` for a copy)."""
        return [(e.tokens.tolist(), e.cache) for e in self._entries]

    def clear(self) -> None:
        """Drop every entry for good (the model is unloading)."""
        self._closed = True
        self._entries.clear()
        self.nbytes = 0

    def _touch(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        self._entries.append(entry)

    def _remove(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        self.nbytes -= entry.nbytes


def make_prefix_cache(model_id: str, spec: ModelSpec) -> PrefixCache | None:
    """The model's prefix cache, or None when its settings rule one out (logged)."""
    settings = spec.prefix_cache
    if spec.embedding or not settings.enabled:
        return None
    if spec.kv_cache is not None and spec.kv_cache.max_size is not None:
        # A rotating window drops old tokens: once it wraps, no prefix of it can be reused.
        log.info("%s: no prefix cache with kv_cache.max_size (a rotating KV cache)", model_id)
        return None
    return PrefixCache(settings.max_bytes_value, settings.min_tokens)


def storable(cache: list[Any]) -> bool:
    """Plain or quantized KV caches, which `_view` can copy; other kinds (recurrent state,
    sliding windows) cannot be cut back to a shorter prefix."""
    return bool(cache) and all(type(c) in (KVCache, QuantizedKVCache) and c.keys is not None for c in cache)


def _held(cache: list[Any]) -> int:
    return min((int(getattr(c, "offset", 0)) for c in cache), default=0)


def view(c: Any, n: int) -> Any:
    """A cache holding the first n tokens of `c`, sharing its arrays. Their length is exactly n,
    so the copy's first update allocates new arrays (KVCache grows by concatenation) and never
    writes into the stored ones."""
    if type(c) is KVCache:
        new = KVCache()
        new.keys, new.values = c.keys[..., :n, :], c.values[..., :n, :]
    else:
        new = QuantizedKVCache(group_size=c.group_size, bits=c.bits)
        new.keys = tuple(x[..., :n, :] for x in c.keys)
        new.values = tuple(x[..., :n, :] for x in c.values)
    new.offset = n
    return new


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m
