"""Domain errors -> (HTTP status, error kind, message). Each dialect formats the body its own way,
but the mapping lives here, once."""

from __future__ import annotations

from dataclasses import dataclass, replace

from aiohttp import web

from mlx_serve.apis.redact import redact_home
from mlx_serve.daemon.errors import (
    InsufficientMemoryError,
    ModelUnavailableError,
    QueueFullError,
    ShuttingDownError,
    UnknownModelError,
)
from mlx_serve.engines.errors import ContextOverflowError, ModelLoadError, UnsupportedRequestError


class RequestError(Exception):
    """A client mistake found while reading a request: 4xx with the offending field."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class ErrorInfo:
    status: int
    kind: str  # invalid_request | not_found | overloaded | unavailable | authentication | permission | rate_limit | too_large | internal
    message: str
    param: str | None = None
    retry_after: float | None = None


def classify(exc: BaseException) -> ErrorInfo:
    """Its messages may be sent in-band (stream error events), so they are redacted here too."""
    info = _classify(exc)
    return replace(info, message=redact_home(info.message))


def _classify(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, RequestError):
        return ErrorInfo(exc.status, exc.kind, exc.message, exc.param)
    if isinstance(exc, UnknownModelError):
        return ErrorInfo(404, "not_found", str(exc), "model")
    if isinstance(exc, ContextOverflowError):
        return ErrorInfo(400, "context_length_exceeded", str(exc), "messages")
    if isinstance(exc, UnsupportedRequestError):
        return ErrorInfo(400, "invalid_request", str(exc))
    if isinstance(exc, QueueFullError | ShuttingDownError):
        return ErrorInfo(503, "overloaded", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, InsufficientMemoryError):
        return ErrorInfo(503, "unavailable", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, ModelUnavailableError):
        return ErrorInfo(503, "unavailable", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, ModelLoadError):
        return ErrorInfo(503, "unavailable", str(exc))
    return ErrorInfo(500, "internal", "internal server error")


_OPENAI_TYPES = {
    "invalid_request": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    "not_found": "invalid_request_error",
    "no_route": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "rate_limit": "rate_limit_error",
    "too_large": "invalid_request_error",
    "overloaded": "server_error",
    "unavailable": "server_error",
    "internal": "server_error",
}
_OPENAI_CODES = {"not_found": "model_not_found", "context_length_exceeded": "context_length_exceeded"}
_ANTHROPIC_TYPES = {
    "invalid_request": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    "not_found": "not_found_error",
    "no_route": "not_found_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "rate_limit": "rate_limit_error",
    "too_large": "request_too_large",
    "overloaded": "overloaded_error",
    "unavailable": "overloaded_error",
    "internal": "api_error",
}


def dialect_for_path(path: str, prefix: str = "") -> str:
    path = path.removeprefix(prefix) if prefix else path
    if path.startswith("/api/") or path == "/api":
        return "ollama"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai"


def error_body(dialect: str, info: ErrorInfo) -> dict:
    """The dialect's error body; a path under the user's home directory shows as `~/...`."""
    info = replace(info, message=redact_home(info.message))
    if dialect == "anthropic":
        return {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(info.kind, "api_error"), "message": info.message},
        }
    if dialect == "ollama":
        return {"error": info.message}
    return {
        "error": {
            "message": info.message,
            "type": _OPENAI_TYPES.get(info.kind, "server_error"),
            "param": info.param,
            "code": _OPENAI_CODES.get(
                info.kind, info.kind if info.status < 500 and info.kind != "no_route" else None
            ),
        }
    }


def error_response(dialect: str, info: ErrorInfo) -> web.Response:
    headers = {"Retry-After": str(max(1, round(info.retry_after)))} if info.retry_after else None
    return web.json_response(error_body(dialect, info), status=info.status, headers=headers)
