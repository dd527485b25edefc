"""Registry-level domain errors. Each dialect maps them (and engine errors) to its error body once,
through apis/errors.py."""

from __future__ import annotations


class RegistryError(Exception):
    pass


class UnknownModelError(RegistryError):
    def __init__(self, name: str) -> None:
        shown = name if len(name) <= 80 else name[:77] + "..."
        super().__init__(f"model {shown!r} is not in this server's profile")
        self.name = name


class ModelUnavailableError(RegistryError):
    """The model failed to load (retried with backoff) or is being removed."""

    def __init__(self, model_id: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"model {model_id!r} is unavailable: {reason}")
        self.model_id = model_id
        self.retry_after = retry_after


class QueueFullError(RegistryError):
    def __init__(self, model_id: str, depth: int, retry_after: float = 1.0) -> None:
        super().__init__(f"model {model_id!r} has {depth} requests waiting; try again shortly")
        self.model_id = model_id
        self.retry_after = retry_after


class InsufficientMemoryError(RegistryError):
    def __init__(self, model_id: str, needed: int, budget: int, busy: list[str]) -> None:
        gib = 2**30
        detail = f"; busy models that cannot be evicted: {', '.join(busy)}" if busy else ""
        super().__init__(
            f"model {model_id!r} needs about {needed / gib:.1f} GiB but the memory budget is {budget / gib:.1f} GiB{detail}"
        )
        self.model_id = model_id
        self.retry_after = 5.0


class ShuttingDownError(RegistryError):
    def __init__(self) -> None:
        super().__init__("server is shutting down")
        self.retry_after = 5.0
