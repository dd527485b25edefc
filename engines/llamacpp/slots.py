"""The batch scheduler's slots (llamacpp/batch.py): which sequence of the context a request takes,
and what KV each sequence keeps. Slot i owns sequence id i.

Prefix reuse, per sequence: a slot keeps the KV of its last request (finished or cancelled); in
its own stream it costs the others nothing. A new request takes the free slot sharing the longest
prompt prefix if that covers half its prompt, drops the rest of that sequence
(llama_memory_seq_rm) and decodes only what differs (editors resend nearly the same prompt). Else
it takes the free slot that keeps the running sequence ids most contiguous (llama.cpp decodes one
pass per run of consecutive ids), empty and least recently used first. Beyond the slots, the
prefix store (llamacpp/prefix_cache.py) keeps the KV a slot is about to lose in host memory and
restores it into a slot when it shares more with a new prompt than any free slot does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import llama_cpp

import mlx_serve.engines.llamacpp.decode as dec
from mlx_serve.engines.llamacpp.prefix_cache import PrefixStore


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds, by position
    busy: bool = False
    released: int = 0  # step of the last release (least recently used goes first)


def _runs(ids: set[int]) -> int:  # runs of consecutive sequence ids: llama.cpp's passes per step
    return sum(1 for i in ids if i - 1 not in ids)


class Slots:
    """One slot per sequence of the context; engine thread only."""

    def __init__(
        self,
        llm: llama_cpp.Llama,
        prefixes: PrefixStore | None = None,  # earlier prompts' KV beyond what the slots hold
    ) -> None:
        self._llm, self._prefixes = llm, prefixes
        self._slots = [Slot(i) for i in range(llama_cpp.llama_n_seq_max(llm.ctx))]

    def assign(self, prompt: list[int]) -> Slot | None:
        """The free slot sharing the longest prompt prefix if that covers at least half the prompt
        (llama.cpp server's rule: sharing a BOS or a short system prompt is not worth evicting a
        long cache), else the one keeping the running ids contiguous (module doc); None when all
        are busy. An entry of the prefix store sharing more than every free slot is restored into
        the latter. Whatever KV the chosen slot loses goes to the store first, if worth keeping.
        The slot comes back busy, its KV trimmed to what the prompt reuses."""
        free = [slot for slot in self._slots if not slot.busy]
        if not free:
            return None
        store = self._prefixes
        shared = {id(slot): dec.common_prefix(slot.cached, prompt) for slot in free}
        slot = max(free, key=lambda s: shared[id(s)])
        entry, stored = store.match(prompt) if store is not None else (None, 0)
        if store is not None and entry is not None and stored > shared[id(slot)]:
            slot = self._coldest(free)
            slot.cached = store.swap(slot.seq_id, slot.cached, entry)
            keep = min(stored, len(prompt) - 1) if slot.cached else 0
        else:
            if 2 * shared[id(slot)] < len(prompt):
                slot = self._coldest(free)
            keep = min(shared[id(slot)], len(prompt) - 1)  # decode at least one token: fresh logits
            if store is not None:
                store.offload(slot.seq_id, slot.cached, keep)
        self.trim(slot, keep)
        slot.busy = True
        return slot

    def _coldest(self, free: list[Slot]) -> Slot:
        """The free slot keeping the running ids contiguous; empty, then least recently used first."""
        busy = {s.seq_id for s in self._slots if s.busy}
        return min(free, key=lambda s: (_runs(busy | {s.seq_id}), bool(s.cached), s.released))

    def trim(self, slot: Slot, keep: int) -> None:
        """Drop the slot's KV from position `keep` on."""
        if keep >= len(slot.cached):
            return
        memory = llama_cpp.llama_get_memory(self._llm.ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, 0, -1)  # partial removal refused: all
            keep = 0
        del slot.cached[keep:]

    def release(self, slot: Slot, step: int) -> None:
        """Free the slot at scheduler step `step`; its KV stays for prefix reuse."""
        slot.busy, slot.released = False, step

    def forget_all(self) -> None:
        """Drop every sequence's KV (the context is in an unknown state)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._llm.ctx), True)
        for slot in self._slots:
            slot.cached.clear()

    def held_sequences(self) -> list[tuple[int, list[int]]]:
        """(sequence id, tokens whose KV it holds) per slot; engine thread, between steps."""
        return [(slot.seq_id, list(slot.cached)) for slot in self._slots if slot.cached]
