"""Prefix-cache entries on disk (`prefix_cache.persist`), so hot prefixes survive a reload or restart.

Saved when the model unloads (the registry unloads every model on a graceful shutdown, and before
reloading an edited one), loaded back when it loads, in the model's folder (prefix_disk.py). One
safetensors file per entry (mlx-lm's save_prompt_cache), its tokens in the metadata, oldest
first so the LRU order survives. Engine thread only (ARCHITECTURE.md "Verified facts").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from mlx_serve.engines.mlx.prefix_cache import PrefixCache, view
from mlx_serve.engines.sources.prefix_disk import replace_folder, store_dir
from mlx_serve.profiles.schema import ModelSpec

log = logging.getLogger("mlx_serve.engines.mlx")


def restore(model_id: str, spec: ModelSpec, model_dir: Path, prefix: PrefixCache | None) -> Path | None:
    """With `persist` on: read the model's saved entries into `prefix`, and return the folder to
    save them to on unload (None: nothing to persist)."""
    if prefix is None or not spec.prefix_cache.persist:
        return None
    folder = store_dir(model_id, spec, list(model_dir.iterdir()))
    log.info("%s: %d cached prefixes read from %s", model_id, load(prefix, folder), folder)
    return folder


def persist(prefix: PrefixCache, folder: Path | None) -> None:
    """Save the entries on unload; a failure only makes the next load start colder."""
    if folder is None:
        return
    try:
        log.info("%d cached prefixes saved to %s", save(prefix, folder), folder)
    except Exception:
        log.exception("could not save the prefix cache to %s", folder)


def save(prefix: PrefixCache, folder: Path) -> int:
    """Replace the folder's entries with the cache's; returns how many were written."""

    def write(tmp: Path) -> int:
        entries = prefix.entries()
        for i, (tokens, cache) in enumerate(entries):
            held = [view(c, c.offset) for c in cache]  # without the allocation padding
            save_prompt_cache(str(tmp / f"{i:05d}.safetensors"), held, {"tokens": json.dumps(tokens)})
        return len(entries)

    return replace_folder(folder, write)


def load(prefix: PrefixCache, folder: Path) -> int:
    """Store the folder's entries into the cache (within its bounds); returns how many were kept."""
    kept = 0
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            cache, metadata = load_prompt_cache(str(file), return_metadata=True)
            kept += prefix.store(json.loads(metadata["tokens"]), cache)
        except Exception as exc:  # a torn or foreign file costs a cache hit, nothing else
            log.warning("skipping unreadable KV cache file %s: %s", file, exc)
    return kept
