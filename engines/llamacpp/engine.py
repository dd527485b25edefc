"""The llama.cpp engine: GGUF models through llama-cpp-python, behind the Engine protocol.

Every call on the `Llama` object runs on the engine's own thread (it is not thread-safe). Prompts
are rendered from the GGUF's chat template in our sandbox (prompting.py), never by llama-cpp-python's
chat handlers, and tokenized in llamacpp/prompt.py. Decoding uses llama-cpp-python's context, batch
and sampler objects directly rather than `Llama.generate`, for three reasons: per-token logprobs
without `logits_all` (which keeps an n_ctx x n_vocab float array), prompt-lookup drafts verified in
one batch with only that batch's logits, and draft statistics for Usage (see llamacpp/decode.py).
Loading, GGUF validation and the profile's llama.cpp settings live in llamacpp/load.py.

With `max_concurrency = 1` (the default) requests run one at a time, FIFO, each as one job on the
engine thread (`_produce`), with KV prefix reuse across requests (the context's own KV, and
earlier prompts' KV kept in host memory, llamacpp/prefix_cache.py). With `max_concurrency = N > 1`
the context holds N sequences and requests decode together, joining and leaving between steps
(continuous batching, llamacpp/batch.py). Embedding models never batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

import mlx_serve.engines.llamacpp.prefix_disk as prefix_disk
from mlx_serve.engines.errors import (
    ContextOverflowError,
    EngineNotLoadedError,
    ModelLoadError,
    UnsupportedRequestError,
)
from mlx_serve.engines.llamacpp.batch import BatchScheduler
from mlx_serve.engines.llamacpp.decode import (
    Decoder,
    DraftStats,
    Output,
    Prepared,
    forget_cache,
    make_sampler,
    plain_greedy,
)
from mlx_serve.engines.llamacpp.load import GGUFHeader, kv_cache_bytes, load_llama, sequences
from mlx_serve.engines.llamacpp.prefix_cache import PrefixStore
from mlx_serve.engines.llamacpp.prompt import build_prompt, prompt_tokenizer
from mlx_serve.engines.sources.prefix_disk import store_dir
from mlx_serve.engines.sources.resolve import gguf_file
from mlx_serve.engines.text.constrained import JsonConstraint
from mlx_serve.engines.text.prompt_tokens import PromptTokenizer
from mlx_serve.engines.text.prompting import (
    ChatTemplate,
    TemplateError,
    check_template,
    fim_tokens_from_vocab,
    tool_format_for,
)
from mlx_serve.engines.text.reasoning import ReasoningFormat, detect_reasoning
from mlx_serve.engines.types import Capability, EngineInfo, Event, GenerationRequest, SamplingParams
from mlx_serve.engines.worker import Emit, EngineThread
from mlx_serve.profiles.schema import ModelSpec

# Used when neither the request nor the profile's [sampling] sets a value. Neutral, as in the MLX
# engine (mlx/sampling.py): temperature 1.0 is the OpenAI/Anthropic default; top-k 0, top-p 1 and
# min-p 0 are no-ops in llama.cpp's samplers. Profiles set per-model values.
DEFAULT_SAMPLING: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
# Control tokens that are rendered as text although they are "special": parsers need to see them.
MARKER_TOKENS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<think>", "</think>")


@dataclass(frozen=True)
class _Model:
    """Everything one load produced; swapped in and out as a whole."""

    llm: llama_cpp.Llama
    header: GGUFHeader
    decoder: Decoder
    n_ctx: int  # the profile's context (llama.cpp pads its own up to a multiple of 256)
    template: ChatTemplate | None
    reasoning: ReasoningFormat | None
    fim: tuple[str, str, str] | None
    path: Path | None = None  # the GGUF file
    batch: BatchScheduler | None = None  # max_concurrency > 1: requests decode together
    prefixes: PrefixStore | None = None  # earlier prompts' KV in host memory (not for embeddings)
    persist_to: Path | None = None  # prefix_cache.persist: where the store is saved on unload
    prompt_tokens: PromptTokenizer | None = None  # tokenizes prompts reusing earlier prompts' ids


class LlamaCppEngine:
    def __init__(self, model_id: str, spec: ModelSpec) -> None:
        self.model_id = model_id
        self.spec = spec
        self.generated_tokens = 0  # tokens sampled over the engine's life (cancellation is measured by it)
        self._thread: EngineThread | None = None
        self._model: _Model | None = None
        self._load_lock = asyncio.Lock()
        self._abandoned: set[asyncio.Task[None]] = set()

    # ---- lifecycle -------------------------------------------------------------------------

    async def load(self) -> None:
        async with self._load_lock:
            if self._model is not None:
                return
            thread = EngineThread(f"llama.cpp:{self.model_id}")
            job = asyncio.ensure_future(thread.call(self._load_sync))
            try:
                model = await asyncio.shield(job)
            except asyncio.CancelledError:  # a native load cannot be interrupted: free it when it ends
                task = asyncio.ensure_future(_discard(thread, job))
                self._abandoned.add(task)
                task.add_done_callback(self._abandoned.discard)
                raise
            except BaseException:
                await asyncio.to_thread(thread.close)
                raise
            if not self.spec.embedding:
                model = dataclasses.replace(model, prefixes=PrefixStore(model.llm, self.spec.prefix_cache))
                if self.spec.prefix_cache.enabled and self.spec.prefix_cache.persist:
                    folder = store_dir(self.model_id, self.spec, [model.path])
                    model = dataclasses.replace(model, persist_to=folder)
                    await thread.call(prefix_disk.load, model.prefixes, folder)
            if sequences(self.spec) > 1:  # load_llama made the context hold that many sequences
                lookup = self.spec.speculative.prompt_lookup if self.spec.speculative else None
                batch = BatchScheduler(thread, model.llm, lookup, self._count, model.prefixes)
                model = dataclasses.replace(model, batch=batch)
            self._thread, self._model = thread, model

    def _load_sync(self) -> _Model:
        path = gguf_file(self.model_id, self.spec)
        llm, header = load_llama(self.model_id, path, self.spec)
        try:
            return dataclasses.replace(self._describe(llm, header), path=path)
        except BaseException:
            llm.close()
            raise

    def _describe(self, llm: llama_cpp.Llama, header: GGUFHeader) -> _Model:
        """Chat template, reasoning tags and FIM tokens from the GGUF; the decoder for this model."""
        tokens = header.tokens
        source = self._template_source(header)
        template, reasoning = None, None
        if source and not self.spec.embedding:

            def text_of(key: str) -> str:
                tid = header.metadata.get(key)
                return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else ""

            template = ChatTemplate(
                source, text_of("tokenizer.ggml.bos_token_id"), text_of("tokenizer.ggml.eos_token_id")
            )
            try:
                check_template(template)
            except TemplateError as exc:
                raise ModelLoadError(self.model_id, str(exc)) from None
            reasoning = detect_reasoning(source)
        markers = set(MARKER_TOKENS) | ({reasoning.start, reasoning.end} if reasoning else set())
        decoder = Decoder(llm, (i for i, t in enumerate(tokens) if t in markers))
        n_ctx = min(llm.n_ctx(), llm.context_params.n_ctx)
        fim = fim_tokens_from_vocab(tokens)
        prompt_tokens = prompt_tokenizer(llm, tokens)
        return _Model(llm, header, decoder, n_ctx, template, reasoning, fim, prompt_tokens=prompt_tokens)

    def _template_source(self, header: GGUFHeader) -> str | None:
        """The profile's chat_template (Jinja text, or a path to a file holding it), else the GGUF's."""
        override = self.spec.chat_template
        if override and "{{" not in override and "{%" not in override:
            path = Path(override).expanduser()
            try:
                return path.read_text()
            except OSError as exc:
                raise ModelLoadError(
                    self.model_id, f"chat_template file {path}: {exc.strerror or exc}"
                ) from None
        return override or header.metadata.get("tokenizer.chat_template")

    async def unload(self) -> None:
        async with self._load_lock:
            thread, model = self._thread, self._model
            self._thread, self._model = None, None  # jobs still queued now fail with EngineNotLoadedError
            if thread is None:
                return
            if model is not None:
                await thread.call(_close, model)
            await asyncio.to_thread(thread.close)

    def _require(self) -> tuple[_Model, EngineThread]:
        if self._model is None or self._thread is None:
            raise EngineNotLoadedError(f"model {self.model_id!r} is not loaded")
        return self._model, self._thread

    def _live(self) -> _Model:
        """The model, checked on the engine thread: jobs queued behind unload() find it gone."""
        if self._model is None:
            raise EngineNotLoadedError(f"model {self.model_id!r} is not loaded")
        return self._model

    # ---- metadata --------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        model, _ = self._require()
        header = model.header
        caps: set[Capability] = set()
        if self.spec.embedding:
            caps.add("embedding")
        else:
            caps.add("completion")
            if model.template is not None:
                caps |= {"chat", "tools"}  # templates without tool support get the Hermes tool prompt
            if model.fim is not None:
                caps.add("fim")
        return EngineInfo(
            context_length=model.n_ctx,
            capabilities=frozenset(caps),
            engine="llama_cpp",
            architecture=header.architecture,
            parameter_count=header.parameter_count,
            quantization=header.quantization,
            embedding_length=model.llm.n_embd(),
            fim_tokens=model.fim,
            chat_template=model.template.source if model.template else None,
        )

    def memory_bytes(self) -> int:
        """Weights (file size) + the KV cache for n_ctx and the prefix store's entries; 0 when not
        loaded."""
        return sum(self.memory_breakdown().values())

    def memory_breakdown(self) -> dict[str, int]:
        model = self._model
        if model is None:
            return {"weights": 0, "kv_cache": 0}
        bits = self.spec.kv_cache.bits if self.spec.kv_cache else None
        return {
            "weights": model.header.file_size,
            "kv_cache": kv_cache_bytes(model.header, model.llm.n_ctx(), bits)
            + (model.prefixes.nbytes if model.prefixes is not None else 0),
        }

    # ---- prompts ---------------------------------------------------------------------------

    async def count_tokens(self, request: GenerationRequest) -> int:
        model, thread = self._require()
        call = model.batch.call if model.batch else thread.call  # between the scheduler's steps
        return len((await call(self._prompt, request))[1])

    def _prompt(self, request: GenerationRequest) -> tuple[_Model, list[int], str]:
        """(model, tokens, text) exactly as generate() decodes them."""
        model = self._live()
        tokens, text = build_prompt(model, request, self.model_id)
        return model, tokens, text

    def _prepare(self, request: GenerationRequest) -> Prepared:
        if self.spec.embedding:
            raise UnsupportedRequestError(
                f"model {self.model_id!r} is an embedding model; it does not generate"
            )
        model, tokens, text = self._prompt(request)
        n_ctx, is_chat = model.n_ctx, request.messages is not None
        if len(tokens) >= n_ctx:
            raise ContextOverflowError(len(tokens), n_ctx)
        s = request.sampling
        max_tokens = s.max_tokens or self.spec.sampling.max_tokens or n_ctx
        hint = f"{self.model_id} {model.header.metadata.get('general.name', '')}"
        return Prepared(
            model=model,
            tokens=tokens,
            text=text,
            stops=s.stop,
            reasoning=model.reasoning if is_chat else None,
            tool_format=tool_format_for(model.template, hint, bool(request.tools)) if is_chat else None,
            sampling=self._sampling(s),
            budget=min(max_tokens, n_ctx - len(tokens)),
            logprobs=s.logprobs or s.top_logprobs > 0,
            top_logprobs=s.top_logprobs,
            # Built here, before streaming, so a schema the grammar library rejects is a 400.
            constraint=JsonConstraint.for_llama(model.llm, request.response_format),
        )

    def _sampling(self, s: SamplingParams) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": s.seed}
        for name, default in DEFAULT_SAMPLING.items():
            value = getattr(s, name)
            if value is None:
                value = getattr(self.spec.sampling, name)
            out[name] = default if value is None else value
        return out

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        model, thread = self._require()
        if model.batch is not None:  # prepared on the engine thread between the scheduler's steps
            stream = model.batch.stream(partial(self._prepare, request))
        else:
            prepared = await thread.call(self._prepare, request)
            stream = thread.stream(partial(self._produce, prepared))
        async with aclosing(stream) as events:
            async for event in events:
                yield event

    def _count(self, n: int) -> None:
        self.generated_tokens += n

    def _produce(self, prep: Prepared, emit: Emit, cancelled: threading.Event) -> None:
        """One request alone on the engine thread (max_concurrency = 1)."""
        if self._live() is not prep.model:
            raise EngineNotLoadedError(f"model {self.model_id!r} was reloaded")
        llm, decoder = prep.model.llm, prep.model.decoder
        sampler = make_sampler(llm, prep.sampling)
        stats = DraftStats()
        lookup = self.spec.speculative.prompt_lookup if self.spec.speculative else None
        try:
            cached = decoder.prefill(prep.tokens, prep.model.prefixes)
            out = Output(prep, decoder)
            tokens = decoder.tokens(
                sampler,
                prep.tokens,
                prep.budget,
                lookup,
                prep.logprobs,
                prep.top_logprobs,
                stats,
                prep.constraint,
                argmax=plain_greedy(prep.sampling),
            )
            try:
                for token, logprobs in tokens:
                    self.generated_tokens += 1
                    for event in out.push(token, logprobs):
                        emit(event)
                    if out.done:
                        break
                    if cancelled.is_set():
                        return
            finally:
                tokens.close()
            for event in out.finish(len(prep.tokens), cached, stats):
                emit(event)
        except BaseException:
            forget_cache(llm)  # a failed decode leaves the KV cache in an unknown state
            raise
        finally:
            sampler.close()

    # ---- embeddings ------------------------------------------------------------------------

    async def embed(self, texts: list[str]) -> list[list[float]]:
        _, thread = self._require()
        if not self.spec.embedding:
            raise UnsupportedRequestError(
                f"model {self.model_id!r} is not an embedding model (set embedding = true in its profile)"
            )
        return await thread.call(self._embed_sync, list(texts))

    def _embed_sync(self, texts: list[str]) -> list[list[float]]:
        llm = self._live().llm
        for text in texts:
            n = len(llm.tokenize(text.encode("utf-8"), add_bos=True))  # as Llama.embed tokenizes
            if n == 0:
                raise UnsupportedRequestError("cannot embed an empty string")
            if n > llm.n_batch:
                raise ContextOverflowError(n, llm.n_batch)
        if not texts:
            return []
        out = []
        for vec in llm.embed(texts, normalize=False, truncate=False):
            arr = np.asarray(vec, dtype=np.float64)
            if arr.ndim == 2:  # a model whose pooling type is NONE: per-token vectors, mean-pool them
                arr = arr.mean(axis=0)
            norm = float(np.linalg.norm(arr))
            out.append((arr / norm if norm > 0 else arr).tolist())
        return out


def _close(model: _Model) -> None:
    if model.prefixes is not None and model.persist_to is not None:
        prefix_disk.save(model.prefixes, _held_sequences(model), model.persist_to)
    if model.batch is not None:
        model.batch.close()
    if model.prefixes is not None:
        model.prefixes.clear()
    model.llm.close()


def _held_sequences(model: _Model) -> list[tuple[int, list[int]]]:
    """(sequence id, tokens whose KV it holds) for every sequence still holding KV."""
    if model.batch is not None:
        return model.batch.held_sequences()
    llm = model.llm
    return [(0, llm.input_ids[: llm.n_tokens].tolist())]


async def _discard(thread: EngineThread, job: asyncio.Future[_Model]) -> None:
    """Free a model whose load() was cancelled, once the load has finished, and its thread."""
    try:
        model = await job
    except BaseException:
        model = None
    if model is not None:
        await thread.call(model.llm.close)
    await asyncio.to_thread(thread.close)
