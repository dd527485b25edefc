"""The MLX engine: mlx-lm models behind the Engine protocol.

All MLX work (load, generation, embeddings, unload) runs on the engine's own EngineThread
(ARCHITECTURE.md "Verified facts": MLX streams are thread-local). Prompts are built and tokenized on the event loop's
side (in a worker thread, under a lock shared with the engine thread, because Hugging Face
tokenizers are not safe to use from two threads at once), so a prompt that does not fit is
rejected at once instead of after the requests queued ahead of it.

With `max_concurrency` 1 (the default) requests run one at a time, in arrival order (mlx.generation);
above 1 they decode together, continuously batched (mlx.batch), unless speculative decoding or a
quantized KV cache keeps the model at batch size 1 (mlx.batch.single_request_reason).

Loading the model files, the draft model and the chat template, and the load-time checks of the
profile's settings against them, are in mlx.load.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Any

import mlx.core as mx
from mlx_lm.utils import get_total_parameters

import mlx_serve.engines.mlx.prefix_disk as prefix_store
from mlx_serve.engines.errors import (
    ContextOverflowError,
    EngineNotLoadedError,
    ModelLoadError,
    UnsupportedRequestError,
)
from mlx_serve.engines.mlx.batch import BatchScheduler, make_scheduler
from mlx_serve.engines.mlx.generation import DecodePlan, EngineCounters, LoadedModel, run_generation
from mlx_serve.engines.mlx.load import (
    check_kv_group,
    check_kv_settings,
    load_draft,
    load_mlx,
    select_chat_template,
    weights_nbytes,
)
from mlx_serve.engines.mlx.prefix_cache import PrefixCache, make_prefix_cache
from mlx_serve.engines.mlx.sampling import resolve_sampling
from mlx_serve.engines.sources.resolve import mlx_model_dir
from mlx_serve.engines.text.constrained import JsonConstraint
from mlx_serve.engines.text.prompt_tokens import PromptTokenizer, hf_special_tokens
from mlx_serve.engines.text.prompting import (
    ChatTemplate,
    TemplateError,
    build_fim_prompt,
    fim_tokens_from_vocab,
    render_chat,
    tool_format_for,
)
from mlx_serve.engines.text.reasoning import ReasoningFormat, detect_reasoning
from mlx_serve.engines.types import Capability, EngineInfo, Event, GenerationRequest
from mlx_serve.engines.worker import EngineThread
from mlx_serve.profiles.schema import ModelSpec

log = logging.getLogger("mlx_serve.engines.mlx")
FALLBACK_CONTEXT = 4096  # when neither the profile nor the model config names a context length


class MLXEngine:
    """One mlx-lm model (plus an optional draft model for speculative decoding)."""

    engine = "mlx"

    def __init__(self, model_id: str, spec: ModelSpec, draft: tuple[str, ModelSpec] | None = None) -> None:
        self.model_id = model_id
        self.spec = spec
        self.counters = EngineCounters()
        self._draft = draft
        self._thread: EngineThread | None = None
        self._loaded: LoadedModel | None = None
        self._info: EngineInfo | None = None
        self._template: ChatTemplate | None = None
        self._reasoning: ReasoningFormat | None = None
        self._batch: BatchScheduler | None = None  # when requests decode together (max_concurrency > 1)
        self._lifecycle = asyncio.Lock()

    @property
    def thread_ident(self) -> int | None:
        """The engine thread's id (None before load); every MLX call runs there."""
        return self._thread.ident if self._thread else None

    # -- lifecycle -----------------------------------------------------------------------------

    async def load(self) -> None:
        async with self._lifecycle:
            if self._loaded is not None:
                return
            thread = EngineThread(f"mlx-engine:{self.model_id}")
            try:
                loaded, template, info = await thread.call(self._load_on_thread)
            except BaseException as exc:
                thread.close(timeout=0)  # the thread exits after its current job
                if isinstance(exc, Exception) and not isinstance(exc, ModelLoadError):
                    raise ModelLoadError(self.model_id, f"{type(exc).__name__}: {exc}") from exc
                raise
            self._thread, self._loaded, self._template = thread, loaded, template
            self._reasoning = detect_reasoning(template.source) if template else None
            self._info = info
            self._batch = make_scheduler(self.model_id, loaded, self.spec, self.counters, thread)
            log.info(
                "loaded %s: %s, context %d, %.0f MB of weights",
                self.model_id,
                self._info.architecture,
                self._info.context_length,
                loaded.weights_bytes / 2**20,
            )

    async def unload(self) -> None:
        async with self._lifecycle:
            thread, self._thread, self._batch = self._thread, None, None
            loaded, self._loaded = self._loaded, None
            self._info, self._template, self._reasoning = None, None, None
            if thread is None:
                return
            try:  # queued behind any running generation, which keeps its own reference until done
                await thread.call(_release_memory, loaded)
            finally:
                await asyncio.to_thread(thread.close)
            log.info("unloaded %s", self.model_id)

    def _load_on_thread(self) -> tuple[LoadedModel, ChatTemplate | None, EngineInfo]:
        self.counters.load_thread = threading.get_ident()
        check_kv_settings(self.model_id, self.spec)
        model_dir = mlx_model_dir(self.model_id, self.spec)
        model, tokenizer, config = load_mlx(self.model_id, model_dir)
        check_kv_group(self.model_id, self.spec, config)
        draft_model = None
        if self.spec.speculative is not None and self.spec.speculative.draft_model is not None:
            draft_model = load_draft(self.model_id, self._draft, config)
        template = select_chat_template(self.model_id, self.spec, tokenizer)
        weights = weights_nbytes(model) + (weights_nbytes(draft_model) if draft_model is not None else 0)
        fim = fim_tokens_from_vocab(tokenizer.get_vocab().keys())
        loaded = LoadedModel(model, tokenizer, config, weights, draft_model, fim)
        loaded.prefix = make_prefix_cache(self.model_id, self.spec)
        loaded.prompt_tokens = PromptTokenizer(
            partial(_encode_plain, tokenizer), hf_special_tokens(tokenizer)
        )
        loaded.prefix_dir = prefix_store.restore(self.model_id, self.spec, model_dir, loaded.prefix)
        return loaded, template, self._make_info(loaded, template)

    def _make_info(self, loaded: LoadedModel, template: ChatTemplate | None) -> EngineInfo:
        config = loaded.config
        caps: set[Capability] = set()
        if self.spec.embedding:
            caps.add("embedding")
        else:
            caps.add("completion")
            if template is not None:
                caps |= {"chat", "tools"}
            if loaded.fim_tokens:
                caps.add("fim")
        quant = config.get("quantization")
        return EngineInfo(
            context_length=self._context_length(loaded),
            capabilities=frozenset(caps),
            engine=self.engine,
            architecture=str(config.get("model_type", "unknown")),
            parameter_count=int(get_total_parameters(loaded.model)),
            quantization=f"{quant['bits']}bit" if isinstance(quant, dict) and "bits" in quant else None,
            embedding_length=config.get("hidden_size"),
            fim_tokens=loaded.fim_tokens,
            chat_template=template.source if template else None,
        )

    def _context_length(self, loaded: LoadedModel) -> int:
        if self.spec.context_length:
            return self.spec.context_length
        config = loaded.config
        for source in (config, config.get("text_config") or {}):
            value = source.get("max_position_embeddings")
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(loaded.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 10**7 else FALLBACK_CONTEXT

    # -- queries -------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineNotLoadedError(f"model {self.model_id!r} is not loaded")
        return self._info

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The loaded model's prefix cache (None when unloaded or disabled); engine thread only,
        except its `nbytes` and len()."""
        return self._loaded.prefix if self._loaded is not None else None

    def memory_bytes(self) -> int:
        return sum(self.memory_breakdown().values())

    def memory_breakdown(self) -> dict[str, int]:
        loaded = self._loaded
        if loaded is None:
            return {"weights": 0, "kv_cache": 0}
        prefix = loaded.prefix.nbytes if loaded.prefix is not None else 0
        return {"weights": loaded.weights_bytes, "kv_cache": loaded.kv_bytes + prefix}

    async def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt's exact token count, also when it would not fit the context."""
        loaded = self._require_loaded()
        return len((await asyncio.to_thread(self._prompt, loaded, request))[0])

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if self.spec.embedding:
            raise UnsupportedRequestError(
                f"model {self.model_id!r} is an embedding model; it does not generate"
            )
        plan = await self._plan(request)
        loaded, thread, batch = self._loaded, self._thread, self._batch
        if loaded is None or thread is None:  # unloaded while the prompt was being tokenized
            raise EngineNotLoadedError(f"model {self.model_id!r} is not loaded")
        if batch is not None:
            stream = batch.stream(plan)
        else:
            stream = thread.stream(partial(run_generation, loaded, self.spec, plan, self.counters))
        async with aclosing(stream) as events:
            async for event in events:
                yield event

    async def _plan(self, request: GenerationRequest) -> DecodePlan:
        loaded = self._require_loaded()
        ids, text = await asyncio.to_thread(self._prompt, loaded, request)
        if not ids:
            raise UnsupportedRequestError("the prompt is empty")
        context = self.info().context_length
        if len(ids) >= context:
            raise ContextOverflowError(len(ids), context)
        sampling = resolve_sampling(request.sampling, self.spec.sampling, context - len(ids))
        chat = request.messages is not None
        tools = bool(request.tools) and request.tool_choice != "none"
        constraint = None
        if request.response_format is not None:  # a bad schema raises here, before streaming (400)
            constraint = await asyncio.to_thread(_constraint, loaded, request.response_format)
        return DecodePlan(
            prompt_ids=tuple(ids),
            prompt_text=text,
            sampling=sampling,
            stops=request.sampling.stop,
            reasoning=self._reasoning if chat else None,
            tool_format=tool_format_for(self._template, f"{self.model_id} {self.spec.source}", tools)
            if chat
            else None,
            constraint=constraint,
        )

    def _prompt(self, loaded: LoadedModel, request: GenerationRequest) -> tuple[list[int], str]:
        """(ids, text), rendered and tokenized on a worker thread: a template may take up to its
        time limit, which must not stall the event loop."""
        text, add_special = self._prompt_text(loaded, request)
        return _encode(loaded, text, add_special), text

    def _prompt_text(self, loaded: LoadedModel, request: GenerationRequest) -> tuple[str, bool]:
        """(prompt text, whether the tokenizer should add its special tokens)."""
        if request.messages is not None:
            if request.suffix is not None:
                raise UnsupportedRequestError("fill-in-the-middle (suffix) needs a raw prompt, not messages")
            if self._template is None:
                raise UnsupportedRequestError(
                    f"model {self.model_id!r} has no chat template; send a raw prompt"
                )
            tools = request.tools if request.tool_choice != "none" else ()
            try:
                text = render_chat(self._template, request.messages, tools, request.enable_thinking)
            except TemplateError as exc:
                raise UnsupportedRequestError(str(exc)) from None
            return text, False  # the template writes any special tokens itself
        assert request.prompt is not None
        text = request.prompt
        if request.suffix is not None:
            fim = loaded.fim_tokens
            if not fim:
                raise UnsupportedRequestError(
                    f"model {self.model_id!r} has no fill-in-the-middle tokens; suffix is not supported"
                )
            text = build_fim_prompt(text, request.suffix, fim)
        bos = loaded.tokenizer.bos_token
        return text, request.add_special_tokens and not (bos and text.startswith(bos))

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise EngineNotLoadedError(f"model {self.model_id!r} is not loaded")
        return self._loaded

    # -- embeddings ----------------------------------------------------------------------------

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalized last hidden states (after the final norm), one per text.

        Mean pooling over all tokens suits most LLM-based embedders; models trained for last-token
        pooling (e.g. Qwen3-Embedding) give usable but not optimal vectors this way.
        """
        if not self.spec.embedding:
            raise UnsupportedRequestError(f"model {self.model_id!r} is not an embedding model")
        loaded = self._require_loaded()
        context = self.info().context_length
        batches = await asyncio.to_thread(lambda: [_encode(loaded, t, True) for t in texts])
        for ids in batches:
            if not ids:
                raise UnsupportedRequestError("cannot embed an empty input")
            if len(ids) > context:
                raise ContextOverflowError(len(ids), context)
        thread = self._thread
        if thread is None or self._loaded is not loaded:
            raise EngineNotLoadedError(f"model {self.model_id!r} is not loaded")
        return await thread.call(_embed_on_thread, loaded, batches)


def _constraint(loaded: LoadedModel, response_format: dict[str, Any]) -> JsonConstraint | None:
    with loaded.tokenizer_lock:  # building the grammar's tokenizer view reads the HF tokenizer
        return JsonConstraint.for_mlx(loaded.tokenizer, response_format)


def _encode(loaded: LoadedModel, text: str, add_special_tokens: bool) -> list[int]:
    with loaded.tokenizer_lock:
        if add_special_tokens or loaded.prompt_tokens is None:  # what the tokenizer adds: whole
            return list(loaded.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return loaded.prompt_tokens.encode(text)


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _embed_on_thread(loaded: LoadedModel, batches: list[list[int]]) -> list[list[float]]:
    backbone = getattr(loaded.model, "model", None)
    if not callable(backbone):
        raise UnsupportedRequestError("this architecture does not expose hidden states for embeddings")
    out: list[list[float]] = []
    for ids in batches:
        hidden = backbone(mx.array(ids)[None]).astype(mx.float32)[0]  # (tokens, hidden)
        pooled = hidden.mean(axis=0)
        vector = pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)
        out.append(vector.tolist())
    return out


def _release_memory(loaded: LoadedModel | None) -> None:
    if loaded is not None and loaded.prefix is not None:
        prefix_store.persist(loaded.prefix, loaded.prefix_dir)
        loaded.prefix.clear()  # MLX arrays are freed on the thread that made them
    gc.collect()
    clear = getattr(mx, "clear_cache", None) or mx.metal.clear_cache  # the latter before MLX 0.26
    clear()
