"""Domain errors raised by engines and model sources. Each dialect maps them to its error body once."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for engine failures a client can be told about."""


class ModelLoadError(EngineError):
    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(f"model {model_id!r} failed to load: {reason}")
        self.model_id = model_id
        self.reason = reason


class ContextOverflowError(EngineError):
    def __init__(self, prompt_tokens: int, context_length: int, max_tokens: int = 0) -> None:
        needed = prompt_tokens + max_tokens
        detail = f" + max_tokens {max_tokens}" if max_tokens else ""
        super().__init__(
            f"prompt is {prompt_tokens} tokens{detail} = {needed}, "
            f"over the model's context length of {context_length} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class UnsupportedRequestError(EngineError):
    """The model cannot do what the request asks (e.g. FIM on a model without FIM tokens)."""


class EngineNotLoadedError(EngineError):
    pass
