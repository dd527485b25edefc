"""Import the engine libraries the profile uses once, in the background, right after start.

Library code and module state (llama-cpp-python, mlx, mlx-lm and the transformers tokenizer code
it pulls in) stay resident for the life of the process, whether a model is loaded or not; model
memory does not. Importing them up front means the first request does not pay the import (about a
second for mlx-lm), and after a model's TTL unload the process returns to the footprint it had
before the load. /ready reports not-ready until this is done.
"""

from __future__ import annotations

import importlib
import logging
import threading

from mlx_serve.engines.kind import engine_kind
from mlx_serve.profiles.schema import Profile

log = logging.getLogger("mlx_serve.warmup")
ENGINE_MODULES = {
    "llama_cpp": ("mlx_serve.engines.llamacpp.engine",),
    "mlx": ("mlx_serve.engines.mlx.engine", "transformers.models.auto.tokenization_auto"),
}


class EngineWarmup:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.done.set()  # nothing to do until start()

    def start(self, profile: Profile | None) -> None:
        kinds = sorted({engine_kind(spec) for spec in profile.models.values()}) if profile else []
        if not kinds:
            return
        self.done.clear()
        threading.Thread(target=self._run, args=(kinds,), name="engine-warmup", daemon=True).start()

    def _run(self, kinds: list[str]) -> None:
        try:
            for kind in kinds:
                for module in ENGINE_MODULES[kind]:
                    try:
                        importlib.import_module(module)
                    except ImportError as exc:  # e.g. mlx missing: the model's load reports it
                        log.warning("cannot import %s for the %s engine: %s", module, kind, exc)
            log.info("engine runtimes ready: %s", ", ".join(kinds))
        finally:
            self.done.set()
