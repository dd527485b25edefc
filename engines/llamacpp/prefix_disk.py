"""The llama.cpp prefix store on disk (`prefix_cache.persist`): hot prefixes survive a reload or
a restart.

Saved when the model unloads (the registry unloads every model on a graceful shutdown, and before
reloading an edited one): first the KV the sequences still hold goes into the store (it holds only
what slots lost), then every entry is written, one .npz per entry (its tokens and the bytes of
llama_state_seq_get_data), oldest first so the LRU order survives. Read back on load, within the
store's byte bound. Engine thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mlx_serve.engines.llamacpp.prefix_cache import PrefixStore
from mlx_serve.engines.sources.prefix_disk import replace_folder

log = logging.getLogger("mlx_serve.engines.llama_cpp")


def save(store: PrefixStore, held: Iterable[tuple[int, Sequence[int]]], folder: Path) -> int:
    """Offload each (sequence id, tokens it holds), then replace the folder's entries with the
    store's. Returns how many were written; a failure only makes the next load start colder."""
    try:
        for seq_id, tokens in held:
            store.offload(seq_id, tokens, 0)

        def write(tmp: Path) -> int:
            entries = store.entries()
            for i, entry in enumerate(entries):
                np.savez(tmp / f"{i:05d}.npz", tokens=entry.tokens, state=entry.state)
            return len(entries)

        written = replace_folder(folder, write)
        log.info("%d cached prefixes saved to %s", written, folder)
        return written
    except Exception:
        log.exception("could not save the prefix cache to %s", folder)
        return 0


def load(store: PrefixStore, folder: Path) -> int:
    """Put the folder's entries into the store (within its bound); returns how many were kept."""
    kept = 0
    for file in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        try:
            with np.load(file) as data:
                kept += store.add(data["tokens"].astype(np.intc), data["state"].astype(np.uint8))
        except Exception as exc:  # a torn or foreign file costs a cache hit, nothing else
            log.warning("skipping unreadable KV cache file %s: %s", file, exc)
    if kept:
        log.info("%d cached prefixes read from %s", kept, folder)
    return kept
