"""Prefix cache for the llama.cpp engine: KV states of earlier prompts kept in host memory.

A slot of the batch scheduler (or the one sequence of the one-at-a-time path) keeps the KV of its
last request, so a request resending the same prompt reuses it. That covers one conversation per
slot. This store covers more: when a sequence's KV is about to be dropped for another request
(`offload`), its state is copied out with llama_state_seq_get_data (the sequence's KV cells only,
no logits; ~23 KB per token for SmolLM2 at f16), and a later request whose prompt shares a longer
prefix with an entry than with any free slot gets it back (`swap`: llama_state_seq_set_data into
its sequence, which the caller then trims to the shared prefix and prefills the rest).
Measured on SmolLM2 (1,500 tokens, one thread): save ~26 ms, restore ~5 ms, prefill ~12 s.

Copying lazily, only when KV would otherwise be lost, costs nothing while slots suffice. Entries
are least recently used out first and never hold more than `max_bytes` together; an entry that is
a prefix of a newer one is dropped (the newer one serves every request it would). The store runs
on the engine thread only; `nbytes` is read from others (memory_breakdown) as a plain int.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from mlx_serve.engines.llamacpp.decode import common_prefix
from mlx_serve.profiles import schema

log = logging.getLogger("mlx_serve.engines.llama_cpp")
_U8P = ctypes.POINTER(ctypes.c_uint8)


@dataclass(frozen=True)
class Entry:
    tokens: np.ndarray  # intc: the tokens whose KV the state holds, by position
    state: np.ndarray  # uint8: llama_state_seq_get_data's bytes

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.state.nbytes


class PrefixStore:
    def __init__(self, llm: llama_cpp.Llama, settings: schema.PrefixCache) -> None:
        self._llm = llm  # its context is read at each call: batching replaces it after load
        self.enabled = settings.enabled
        self.max_bytes = settings.max_bytes_value
        self.min_tokens = settings.min_tokens
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self.nbytes = 0

    def entries(self) -> list[Entry]:
        """Least recently used first."""
        return list(self._entries.values())

    def match(self, tokens: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens`, if that is at least min_tokens."""
        best, shared = None, 0
        for entry in self._entries.values():
            n = common_prefix(entry.tokens, tokens)
            if n > shared:
                best, shared = entry, n
        return (best, shared) if shared >= self.min_tokens else (None, 0)

    def offload(self, seq_id: int, held: Sequence[int] | np.ndarray, keep: int) -> None:
        """Before sequence `seq_id`, holding the KV of `held`, loses it from position `keep` on:
        keep a copy if at least min_tokens would be lost and no entry already holds it."""
        n = len(held)
        if not self.enabled or n < self.min_tokens or n - keep < self.min_tokens:
            return
        tokens = np.array(held, dtype=np.intc)
        for key, entry in self._entries.items():
            if len(entry.tokens) >= n and common_prefix(entry.tokens, tokens) == n:
                self._entries.move_to_end(key)  # already kept: the copy would be a duplicate
                return
        ctx = self._llm.ctx
        memory = llama_cpp.llama_get_memory(ctx)
        if llama_cpp.llama_memory_seq_pos_max(memory, seq_id) + 1 != n:
            log.warning("prefix cache: sequence %d holds no KV for its %d tokens; not kept", seq_id, n)
            return
        size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
        if size + tokens.nbytes > self.max_bytes:
            return
        state = np.empty(size, dtype=np.uint8)
        if llama_cpp.llama_state_seq_get_data(ctx, state.ctypes.data_as(_U8P), size, seq_id) != size:
            log.warning("prefix cache: could not copy the state of sequence %d", seq_id)
            return
        self.add(tokens, state)
        log.debug("prefix cache: kept %d tokens (%.1f MiB), %d entries", n, size / 2**20, len(self._entries))

    def add(self, tokens: np.ndarray, state: np.ndarray) -> int:
        """Keep (tokens, their KV state) as the most recently used entry, least recently used out
        first to make room; returns 1 if kept, 0 if it does not qualify."""
        entry = Entry(tokens, state)
        if not self.enabled or len(tokens) < self.min_tokens or entry.nbytes > self.max_bytes:
            return 0
        for key in [k for k, e in self._entries.items() if common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._drop(key)  # a prefix of this one: this one serves every request it would
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[next(self._ids)] = entry
        self.nbytes += entry.nbytes
        return 1

    def swap(self, seq_id: int, held: Sequence[int] | np.ndarray, entry: Entry) -> list[int]:
        """Offload what sequence `seq_id` holds, then replace its KV with the entry's. Returns the
        entry's tokens, or [] (the sequence emptied) if llama.cpp refused the state."""
        key = self._key(entry)
        if key is not None:  # most recently used before the offload makes room: not evicted first
            self._entries.move_to_end(key)
        self.offload(seq_id, held, 0)
        ctx = self._llm.ctx
        state = entry.state
        if (
            llama_cpp.llama_state_seq_set_data(ctx, state.ctypes.data_as(_U8P), state.size, seq_id)
            != state.size
        ):
            log.warning("prefix cache: llama.cpp refused a state of %d tokens; dropped", len(entry.tokens))
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq_id, -1, -1)
            if (key := self._key(entry)) is not None:
                self._drop(key)
            return []
        log.debug("prefix cache: restored %d tokens into sequence %d", len(entry.tokens), seq_id)
        return entry.tokens.tolist()

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _key(self, entry: Entry) -> int | None:
        return next((k for k, e in self._entries.items() if e is entry), None)

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
