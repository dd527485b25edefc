"""The profile: strict pydantic models for `~/.mlx-serve/config.toml`.

Everything is `extra="forbid"` and `strict=True` so a typo or a wrong type is an error, never a
silently ignored setting. Cross-field rules (aliases, draft models, engine/source combinations)
live in `Profile._check_models` so every problem is reported with its dotted key.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .units import parse_duration, parse_size

MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Limits(_Strict):
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 16 * 1024 * 1024
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 16 * 1024
    max_headers: Annotated[int, Field(ge=16, le=1024)] = 128  # header lines per request; more get 400
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 131072
    queue_depth: Annotated[int, Field(ge=1, le=10_000)] = 64
    max_messages: Annotated[int, Field(ge=1, le=100_000)] = 2048
    max_stop_sequences: Annotated[int, Field(ge=1, le=256)] = 16
    max_tools: Annotated[int, Field(ge=1, le=4096)] = 256
    max_json_depth: Annotated[int, Field(ge=4, le=1000)] = 64
    idle_timeout: Annotated[float, Field(gt=0, le=86400)] = 75.0
    # Requests one keep-alive connection may carry (nginx's keepalive_requests); the last response
    # says `Connection: close`. Applies live on reload.
    max_requests_per_connection: Annotated[int, Field(ge=1, le=1_000_000)] = 1000


class Server(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 11435
    unix_socket: str | None = None
    allowed_hosts: list[str] = []
    cors_origins: list[str] = []
    memory_budget: str | float = "75%"
    drain_timeout: Annotated[float, Field(ge=0, le=3600)] = 20.0
    limits: Limits = Limits()

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: str | float) -> str | float:
        parse_size(v, total=1)  # raises ValueError with a readable message
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin == "*" or not re.match(r"^https?://[^/\s*]+$", origin):
                raise ValueError(f"{origin!r} is not an origin like 'http://localhost:3000' (no wildcards)")
        return v


class Apis(_Strict):
    openai: bool = True
    anthropic: bool = True
    ollama: bool = True
    prefix: str = ""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not re.match(r"^(/[A-Za-z0-9._\-]+)+$", v):
            raise ValueError("must look like '/llm' (leading slash, no trailing slash)")
        return v


class Auth(_Strict):
    require_keys: Literal["never", "non_loopback", "always"] = "non_loopback"
    keyring_service: Annotated[str, Field(min_length=1, max_length=128)] = "mlx-serve"
    allow_unauthenticated_network: bool = False
    refresh_interval: Annotated[float, Field(ge=5, le=86400)] = 60.0


class Metrics(_Strict):
    enabled: bool = True
    path: str = "/metrics"
    listen: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not re.match(r"^/[A-Za-z0-9._\-/]*$", v):
            raise ValueError("must be an absolute URL path like '/metrics'")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$", v):
            raise ValueError("must be 'host:port', e.g. '127.0.0.1:9464'")
        return v


class KVCache(_Strict):
    bits: Literal[4, 8] | None = None
    group_size: Literal[32, 64, 128] = 64
    start: Annotated[int, Field(ge=0)] = 0
    max_size: Annotated[int, Field(ge=16)] | None = None


class PromptLookup(_Strict):
    max_ngram: Annotated[int, Field(ge=1, le=16)] = 3
    min_ngram: Annotated[int, Field(ge=1, le=16)] = 1
    num_pred_tokens: Annotated[int, Field(ge=1, le=64)] = 10
    # Adaptive gate (engines/speculation_gate.py): a request drafts only while its acceptance, measured
    # also while it drafts nothing, is at least this and the model's timed cost of a drafted token
    # promises a gain, so novel text pays almost nothing for speculation. 0 = always draft.
    min_acceptance: Annotated[float, Field(ge=0, le=1)] = 0.3

    @model_validator(mode="after")
    def _order(self) -> PromptLookup:
        if self.min_ngram > self.max_ngram:
            raise ValueError("min_ngram must not exceed max_ngram")
        return self


class Speculative(_Strict):
    draft_model: str | None = None
    num_draft_tokens: Annotated[int, Field(ge=1, le=32)] = 3
    prompt_lookup: PromptLookup | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Speculative:
        if (self.draft_model is None) == (self.prompt_lookup is None):
            raise ValueError("set exactly one of draft_model or prompt_lookup")
        return self


class Sampling(_Strict):
    temperature: Annotated[float, Field(ge=0, le=5)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=5)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None


class PrefixCache(_Strict):
    """KV caches of earlier prompts kept for reuse: several prefixes per model, least recently used
    out first, bounded in bytes and counted in the model's memory (and so in the memory budget)."""

    enabled: bool = True
    max_bytes: str | int = "512MiB"
    min_tokens: Annotated[int, Field(ge=1)] = 32  # shorter prompts are cheaper to recompute than to keep
    persist: bool = False  # also keep hot prefixes on disk (~/.mlx-serve/cache/kv/) across restarts

    @field_validator("max_bytes")
    @classmethod
    def _size(cls, v: str | int) -> str | int:
        if isinstance(v, str) and v.strip().endswith("%"):
            raise ValueError("must be an absolute size like '512MiB'")
        parse_size(v, total=1)
        return v

    @property
    def max_bytes_value(self) -> int:
        return parse_size(self.max_bytes, total=1)


Engine = Literal["auto", "mlx", "llama_cpp"]
Quantize = Literal["q4", "q8", "mixed_4_6", "mixed_3_6", "none"]
Duration = int | float | str


class ModelSettings(_Strict):
    """Settings a model may inherit from `[defaults]`."""

    engine: Engine = "auto"
    quantize: Quantize | None = None
    group_size: Literal[32, 64, 128] | None = None
    context_length: Annotated[int, Field(ge=64, le=1 << 21)] | None = None
    kv_cache: KVCache | None = None
    sampling: Sampling = Sampling()
    ttl: Duration = "5m"
    max_concurrency: Annotated[int, Field(ge=1, le=256)] = 1
    threads: Annotated[int, Field(ge=1, le=512)] | None = None
    n_gpu_layers: Annotated[int, Field(ge=-1)] = -1
    flash_attn: bool | None = None  # None: on when llama.cpp runs the layers on a GPU (Metal), off on CPU
    prefix_cache: PrefixCache = PrefixCache()

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: Duration) -> Duration:
        parse_duration(v)
        return v

    @property
    def ttl_seconds(self) -> float | None:
        """Seconds to keep the model after its last use; None = forever."""
        return parse_duration(self.ttl)


class ModelSpec(ModelSettings):
    source: Annotated[str, Field(min_length=1, max_length=4096)]
    revision: str | None = None
    gguf_quant: str | None = None
    aliases: list[str] = []
    speculative: Speculative | None = None
    pin: bool = False
    preload: bool = False
    embedding: bool = False
    chat_template: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.source.lower().endswith(".gguf") or self.gguf_quant is not None

    # Settings whose change needs the weights reloaded; everything else is metadata.
    LOAD_FIELDS: ClassVar[tuple[str, ...]] = (
        "source", "revision", "gguf_quant", "engine", "quantize", "group_size", "context_length",
        "kv_cache", "speculative", "threads", "n_gpu_layers", "flash_attn", "embedding",
        "chat_template", "max_concurrency", "prefix_cache",
    )  # fmt: skip

    def load_key(self) -> dict[str, Any]:
        return self.model_dump(include=set(self.LOAD_FIELDS))


class Defaults(ModelSettings):
    pass


class Profile(_Strict):
    server: Server = Server()
    apis: Apis = Apis()
    auth: Auth = Auth()
    metrics: Metrics = Metrics()
    defaults: Defaults = Defaults()
    models: dict[Annotated[str, Field(pattern=MODEL_ID)], ModelSpec] = {}

    @model_validator(mode="after")
    def _check_models(self) -> Profile:
        problems = list(model_problems(self.models))
        if self.server.host not in ("127.0.0.1", "localhost", "::1") and self.auth.require_keys == "never":
            if not self.auth.allow_unauthenticated_network:
                problems.append(
                    (
                        "auth.require_keys",
                        f"'never' with server.host = {self.server.host!r} exposes every model without a key;"
                        " set auth.allow_unauthenticated_network = true if that is really meant",
                    )
                )
        if problems:
            raise ProfileRuleErrors(problems)
        return self


class ProfileRuleErrors(ValueError):
    """Cross-field problems, each with its dotted key; the loader reports them one per line."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


def model_problems(models: dict[str, ModelSpec]):
    """Yield (dotted key, message) for every cross-model rule a profile breaks."""
    owner: dict[str, str] = {mid: mid for mid in models}
    for mid, spec in models.items():
        for i, alias in enumerate(spec.aliases):
            key = f"models.{mid}.aliases[{i}]"
            if not alias.strip():
                yield key, "alias must not be empty"
                continue
            if alias in owner and owner[alias] != mid:
                what = "model id" if alias in models else f"alias of models.{owner[alias]}"
                yield key, f"{alias!r} is already the {what}"
                continue
            if alias in owner:
                yield key, f"{alias!r} duplicates this model's id or another alias"
                continue
            owner[alias] = mid
            for other in models:
                if other != mid and any(ch in alias for ch in "*?[") and fnmatch.fnmatchcase(other, alias):
                    yield key, f"glob {alias!r} matches the model id {other!r}"
    for mid, spec in models.items():
        yield from _spec_problems(mid, spec, models)


def _spec_problems(mid: str, spec: ModelSpec, models: dict[str, ModelSpec]):
    base = f"models.{mid}"
    if spec.is_gguf and spec.quantize not in (None, "none") and spec.engine == "llama_cpp":
        yield (
            f"{base}.quantize",
            "quantize applies to MLX models; a GGUF file is already quantized (pick gguf_quant instead)",
        )
    if spec.gguf_quant is not None and spec.source.lower().endswith(".gguf"):
        yield (
            f"{base}.gguf_quant",
            "gguf_quant selects a file in a GGUF repo; this source already names one file",
        )
    if spec.engine == "llama_cpp" and not spec.is_gguf:
        yield f"{base}.engine", "llama_cpp needs a GGUF source (a .gguf file or a repo with gguf_quant)"
    if spec.kv_cache and spec.kv_cache.bits and spec.kv_cache.max_size and spec.engine != "llama_cpp":
        yield (
            f"{base}.kv_cache.max_size",
            "MLX cannot quantize a size-bounded (rotating) KV cache; drop bits or max_size",
        )
    if spec.kv_cache and spec.kv_cache.start and spec.engine == "llama_cpp":
        yield f"{base}.kv_cache.start", "llama.cpp quantizes the whole KV cache; start applies to MLX only"
    if spec.speculative and spec.speculative.draft_model is not None:
        draft = spec.speculative.draft_model
        if draft == mid:
            yield f"{base}.speculative.draft_model", "a model cannot draft for itself"
        elif draft not in models:
            yield f"{base}.speculative.draft_model", f"{draft!r} is not a model in this profile"
        elif models[draft].embedding:
            yield f"{base}.speculative.draft_model", f"{draft!r} is an embedding model"
    if spec.embedding and spec.speculative is not None:
        yield f"{base}.speculative", "embedding models do not generate"
