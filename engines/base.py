"""The one interface every engine implements. Dialects and the registry see engines only through it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from mlx_serve.engines.types import EngineInfo, Event, GenerationRequest


@runtime_checkable
class Engine(Protocol):
    model_id: str

    async def load(self) -> None:
        """Load weights; raises ModelLoadError naming the model id and the reason."""

    async def unload(self) -> None:
        """Free weights and caches. Safe to call twice."""

    def info(self) -> EngineInfo:
        """Context length and capabilities; valid after load()."""

    def memory_bytes(self) -> int:
        """Weights plus KV cache currently held, in bytes."""

    def memory_breakdown(self) -> dict[str, int]:
        """memory_bytes() split by kind: {"weights": ..., "kv_cache": ...} (prefix caches count as KV)."""

    async def count_tokens(self, request: GenerationRequest) -> int:
        """Exact prompt token count after templating, as generate() would see it."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events; the last one is always Finished.

        Raises ContextOverflowError (before any event) when the prompt does not fit. Closing the
        iterator early (aclose, or the consuming task being cancelled) stops generation within a
        token or two and frees the engine for the next request.
        """

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """L2-normalized embeddings, one per text; raises UnsupportedRequestError if not an embedding model."""
