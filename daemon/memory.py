"""Give freed memory back to the OS after a model unloads.

Freeing a model's buffers returns them to the C allocator, not to the OS: glibc keeps them in its
arenas, so the daemon's resident memory would stay near its peak after a TTL unload. malloc_trim
releases them. (macOS's allocator returns large freed regions by itself.) MLX keeps freed buffers
in its own cache; buffers freed after the engine's last clear (its thread's last references)
would stay there, so the cache is cleared again here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release_memory() -> None:
    gc.collect()  # drop cycles still holding arrays of the unloaded model
    mlx = sys.modules.get("mlx.core")  # never import MLX just to clear it
    if mlx is not None and hasattr(mlx, "clear_cache"):
        mlx.clear_cache()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass
