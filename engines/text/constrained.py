"""Constrained decoding for `response_format` (OpenAI) and `format` (Ollama): JSON that always parses.

Engine-independent: the grammar engine is llguidance (a token-mask library, see issue 5); this module
only turns a request's `response_format` into an llguidance grammar, adapts each engine's tokenizer,
and masks one logits row at a time. Nothing here knows about HTTP or dialects.

API
---
- `grammar_for(response_format) -> str | None`: None for no constraint ({"type": "text"} too), the
  grammar for {"type": "json_object"} (any JSON object) or {"type": "json_schema", "schema": {...}};
  raises UnsupportedRequestError for a schema llguidance cannot compile, naming the reason.
- `mlx_tokenizer(tokenizer_wrapper)` / `llama_tokenizer(llm)`: the llguidance tokenizer for an
  mlx-lm TokenizerWrapper or a llama-cpp-python `Llama`, built once (~1 s) and cached per object.
- `JsonConstraint(tokenizer, grammar)`, or `JsonConstraint.for_mlx(tokenizer_wrapper, response_format)`
  / `JsonConstraint.for_llama(llm, response_format)` (these return None when response_format asks for
  nothing). One per request: it is stateful and not thread-safe.

Integration, MLX (mlx.generation.token_stream): the constraint IS an mlx-lm logits processor
`processor(tokens, logits) -> logits`; put it last, after the penalty processors::

    constraint = JsonConstraint.for_mlx(loaded.tokenizer, request.response_format)  # in _plan: a
    # bad schema raises UnsupportedRequestError before the stream starts; keep it on the DecodePlan
    processors = s.logits_processors() + ([plan.constraint] if plan.constraint else [])
    common = {..., "logits_processors": processors}

It works with generate_step, speculative_generate_step (the draft model's calls included) and our
prompt_lookup_generate_step: each call re-syncs the matcher to the token history it is given
(rolling back rejected drafts), so nothing else changes. Once the JSON is complete the mask allows
only the tokenizer's EOS ids (`tokenizer.eos_token_ids`), so the existing `token in eos` check ends
the generation with "stop"; `constraint.is_finished()` tells the same thing a step earlier.

Integration, llama.cpp (llamacpp.decode.Decoder.tokens, which samples from the context's logits
with a LlamaSampler chain): mask the logits llama.cpp holds in place before sampling that batch row,
then report the sampled token::

    constraint = JsonConstraint.for_llama(llm, request.response_format)  # per request
    ...
    if constraint is not None:
        constraint.mask_llama_logits(llm, idx)   # before sampler.sample(llm._ctx, idx)
    token = sampler.sample(llm._ctx, idx)
    if constraint is not None:
        constraint.accept(token)                 # raises EngineError if the token broke the grammar

Prompt-lookup drafts need nothing more (each row is masked after the tokens before it were
accepted, so a draft token the grammar rejects is always rejected by the sample too). After the
JSON is complete only end-of-generation tokens (llama_vocab_is_eog) are allowed, so `is_eog` ends
the generation; or stop as soon as `constraint.is_finished()` is true after accept() and save one
decode. The constraint is also a llama-cpp-python `LogitsProcessor` `(input_ids, scores) -> scores`,
usable as `Llama.generate(..., logits_processor=LogitsProcessorList([constraint]))`.

The two styles (history-driven `__call__` and explicit `mask_*` + `accept`) must not be mixed on one
constraint. A constraint must not outlive the model whose tokenizer it uses (the llama.cpp tokenizer
points into the model's vocab).

Vocabulary sizes: a model whose logits row is wider than the tokenizer (padded embeddings) gets the
extra ids masked; a row narrower than the tokenizer ignores the ids it does not have.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from mlx_serve.engines.errors import EngineError, UnsupportedRequestError

log = logging.getLogger("mlx_serve.engines.text.constrained")

# Whitespace allowed between JSON tokens: at most one line break plus indentation. Pretty-printed
# JSON (any indent up to 48 columns) still fits, but a model cannot loop on blank lines or spaces
# forever, the classic failure of unbounded JSON whitespace under constrained decoding.
WHITESPACE_PATTERN = r"(\r?\n)?[ \t]{0,48}"
ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# An unbounded integer lets a small model write digits until max_tokens ("population": 1111...),
# and the reply is not JSON. Like llama.cpp's grammars, bound what the schema leaves open to what
# a 64-bit integer holds: 18 digits, since llguidance computes ranges in f64 and cannot compile
# the exact int64 limits (2**63 - 1 rounds up past them). Numbers get the same integral range and
# at most 9 decimals (llguidance's multipleOf), or the model could loop on fraction digits instead.
INT_BOUND_MIN, INT_BOUND_MAX = -(10**18 - 1), 10**18 - 1
NUMBER_STEP = 1e-9
_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # values, not schemas: left as they are


# ---- grammars ----------------------------------------------------------------------------------
def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar for an internal `GenerationRequest.response_format`, or None.

    Accepts None / {"type": "text"} (no constraint), {"type": "json_object"} and
    {"type": "json_schema", "schema": {...}} (the OpenAI wire shape {"type": "json_schema",
    "json_schema": {"schema": {...}}} is accepted too). Raises UnsupportedRequestError for any other
    type or a schema llguidance rejects (invalid, unsatisfiable or using unsupported features).
    """
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema: Any = ANY_OBJECT_SCHEMA
    elif kind == "json_schema":
        schema = response_format.get("schema")
        nested = response_format.get("json_schema")
        if schema is None and isinstance(nested, dict):
            schema = nested.get("schema")
        if schema is True or schema == {}:
            schema = {}  # any JSON value
        if not isinstance(schema, dict):
            raise UnsupportedRequestError("response_format json_schema needs a JSON schema object")
    else:
        raise UnsupportedRequestError(f"unsupported response_format type {kind!r}")
    try:
        grammar = LLMatcher.grammar_from_json_schema(
            bounded_numbers(schema), defaults={"whitespace_pattern": WHITESPACE_PATTERN}
        )
    except (ValueError, TypeError) as exc:
        raise UnsupportedRequestError(f"response_format schema is not valid: {exc}") from exc
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        reason = messages[0] if messages else "unknown error"
        raise UnsupportedRequestError(f"response_format schema is not supported: {reason}")
    for message in messages:
        log.debug("response_format schema warning: %s", message)
    return grammar


def bounded_numbers(schema: Any) -> Any:
    """A copy of `schema` where every integer or number without a bound gets the 64-bit one."""
    if isinstance(schema, list):
        return [bounded_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else bounded_numbers(v) for k, v in schema.items()}
    kinds = out.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "integer" in kinds or "number" in kinds:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = INT_BOUND_MIN
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = INT_BOUND_MAX
    if "number" in kinds and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_STEP
    return out


# ---- tokenizer adapters (cached per tokenizer / model object) ----------------------------------
_cache_lock = threading.Lock()
_mlx_cache: weakref.WeakKeyDictionary[Any, LLTokenizer] = weakref.WeakKeyDictionary()
_llama_cache: weakref.WeakKeyDictionary[Any, LLTokenizer] = weakref.WeakKeyDictionary()


def hf_tokenizer(hf: Any, eos_ids: Iterable[int]) -> LLTokenizer:
    """An llguidance tokenizer from a Hugging Face fast tokenizer (transformers 4 or 5) or a raw
    `tokenizers.Tokenizer`. Not cached: use mlx_tokenizer() from an engine."""
    backend = getattr(hf, "backend_tokenizer", None)
    backend = hf if backend is None else backend
    if not hasattr(backend, "to_str"):
        raise UnsupportedRequestError("structured output needs a fast (Rust `tokenizers`) tokenizer")
    backend = copy.copy(backend)  # serialize without padding/truncation, leaving the original alone
    backend.no_padding()
    backend.no_truncation()
    eos = sorted({int(t) for t in eos_ids})
    if not eos:
        raise UnsupportedRequestError("structured output needs a tokenizer with an end-of-sequence token")
    return LLTokenizer(backend.to_str(), eos_token=eos)


def mlx_tokenizer(tokenizer: Any) -> LLTokenizer:
    """The llguidance tokenizer for an mlx-lm TokenizerWrapper (`tokenizer._tokenizer` is the HF
    tokenizer); its EOS ids are the wrapper's `eos_token_ids`, the ids the MLX engine stops on."""
    with _cache_lock:
        cached = _mlx_cache.get(tokenizer)
        if cached is None:
            hf = getattr(tokenizer, "_tokenizer", tokenizer)
            eos = getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id]
            cached = _mlx_cache[tokenizer] = hf_tokenizer(hf, eos)
        return cached


def llama_tokenizer(llm: Any) -> LLTokenizer:
    """The llguidance tokenizer for a llama-cpp-python `Llama` (from its vocab); its EOS ids are every
    end-of-generation token (llama_vocab_is_eog), the ids the llama.cpp engine stops on."""
    with _cache_lock:
        cached = _llama_cache.get(llm)
        if cached is None:
            cached = _llama_cache[llm] = _lltokenizer_from_llama(llm)
        return cached


def _lltokenizer_from_llama(llm: Any) -> LLTokenizer:
    """llguidance.llamacpp.lltokenizer_from_vocab, minus its per-token deprecation warnings
    (llama_token_get_attr): control tokens (and <...> user-defined ones) are marked special with a
    0xFF prefix, and llguidance tokenizes through the model's own llama_tokenize."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    size = 256
    buf = ctypes.create_string_buffer(size)
    tokens: list[bytes] = []
    eog: list[int] = []
    for token in range(n):
        length = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if length < 0:
            size = -length
            buf = ctypes.create_string_buffer(size)
            length = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        piece = buf.raw[:length]
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL or (
            attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")
        ):
            piece = b"\xff" + piece
        tokens.append(piece)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            eog.append(token)
    eos = eog or [llama_cpp.llama_vocab_eos(vocab)]
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=eos, slices=None
    )


# ---- the per-request constraint ----------------------------------------------------------------
class JsonConstraint:
    """One request's grammar state: masks logits to the tokens the grammar allows next.

    Explicit style (an engine with its own sampling loop): `mask_logits(row)` (or
    `mask_llama_logits(llm, idx)`) before sampling, `accept(token)` after it, `is_finished()` to
    stop early. History style (mlx-lm and llama-cpp-python logits processors): call the object as
    `constraint(tokens, logits)`; it syncs itself to `tokens`, the full token history the caller
    passes (prompt included: the length at the first call is taken as the prompt).
    """

    def __init__(self, tokenizer: LLTokenizer, grammar: str) -> None:
        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise UnsupportedRequestError(
                f"response_format schema is not supported: {self._matcher.get_error()}"
            )
        self._vocab = tokenizer.vocab_size
        self._eos = tuple(tokenizer.eos_tokens)
        self._eos_set = frozenset(self._eos)
        self._bitmask = allocate_token_bitmask(1, self._vocab)
        self._allowed = np.zeros(0, dtype=bool)
        self._ended = False  # an EOS was accepted: the output is complete
        self._base: int | None = None  # history length at the first __call__ (the prompt)
        self._consumed: list[int] = []  # generated tokens the matcher has consumed (history style)

    @classmethod
    def for_mlx(cls, tokenizer: Any, response_format: dict[str, Any] | None) -> JsonConstraint | None:
        grammar = grammar_for(response_format)
        return None if grammar is None else cls(mlx_tokenizer(tokenizer), grammar)

    @classmethod
    def for_llama(cls, llm: Any, response_format: dict[str, Any] | None) -> JsonConstraint | None:
        grammar = grammar_for(response_format)
        return None if grammar is None else cls(llama_tokenizer(llm), grammar)

    # -- state --
    def is_finished(self) -> bool:
        """The output is complete: nothing but EOS may follow (the engine should stop now)."""
        return self._ended or self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is valid as a whole (EOS is allowed), though more may follow."""
        return self._ended or self._matcher.is_accepting()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. Raises EngineError if the grammar does not allow it (the
        logits were not masked, or masked for another position)."""
        token_id = int(token_id)
        if token_id in self._eos_set and self._matcher.is_accepting():
            self._ended = True
            return
        if self._ended or not self._matcher.consume_token(token_id):
            error = self._matcher.get_error() or "token after the end of the output"
            raise EngineError(f"constrained decoding: token {token_id} rejected: {error}")

    # -- masking --
    def allowed(self, width: int | None = None) -> np.ndarray:
        """Boolean mask over `width` token ids (default: the tokenizer's vocabulary) of the tokens
        allowed next; ids past the tokenizer's vocabulary are never allowed. Never all False: when
        nothing else is possible, the EOS ids are allowed."""
        width = self._vocab if width is None else width
        fill_next_token_bitmask(self._matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        if self._allowed.shape[0] != width:
            self._allowed = np.zeros(width, dtype=bool)
        allowed, n = self._allowed, min(width, self._vocab)
        allowed[:n] = bits[:n]
        allowed[n:] = False
        if not allowed.any():
            allowed[np.array([t for t in self._eos if t < width], dtype=np.intp)] = True
        return allowed

    def mask_logits(self, logits: Any) -> Any:
        """Disallowed tokens set to -inf. A numpy row (shape (V,) or (1, V)) is masked IN PLACE and
        returned; an mlx array (shape (V,) or (1, V)) is returned as a new array of the same dtype."""
        width = int(logits.shape[-1])
        allowed = self.allowed(width)
        if isinstance(logits, np.ndarray):
            logits[..., ~allowed] = -np.inf
            return logits
        import mlx.core as mx

        return mx.where(mx.array(allowed), logits, mx.array(-np.inf, dtype=logits.dtype))

    def mask_llama_logits(self, llm: Any, idx: int = -1) -> None:
        """Mask in place the logits a llama.cpp context holds for batch row `idx` (-1: the last), so
        that the next `LlamaSampler.sample(ctx, idx)` / `llama_sampler_sample` picks an allowed token."""
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, idx)
        self.mask_logits(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)))

    # -- history style: mlx-lm logits processor and llama-cpp-python LogitsProcessor --
    def __call__(self, tokens: Any, logits: Any) -> Any:
        """`processor(tokens, logits) -> logits` for mlx-lm (mx arrays, logits (1, V)) and
        llama-cpp-python (numpy input_ids and a numpy scores row, masked in place)."""
        self.sync(tokens)
        return self.mask_logits(logits)

    def sync(self, history: Any) -> None:
        """Bring the matcher to the state after `history` (prompt + generated tokens, a list, numpy
        or mlx array). The first call's length marks the end of the prompt. Tokens the caller drops
        (rejected speculative drafts) are rolled back; tokens the grammar rejects (an unverified
        draft, a trailing EOS) are not consumed, so the mask is that of the valid prefix."""
        size = len(history)
        if self._base is None:
            self._base = size
            return
        tail = _to_list(history[self._base :]) if size > self._base else []
        consumed = self._consumed
        common = _common_prefix(consumed, tail)
        if common < len(consumed):
            self._matcher.rollback(len(consumed) - common)
            del consumed[common:]
            self._ended = False
        new = tail[common:]
        if new:
            taken = self._matcher.try_consume_tokens(new)
            consumed.extend(new[:taken])
            rest = new[taken:]
            self._ended = bool(rest) and rest[0] in self._eos_set and self._matcher.is_accepting()


def _to_list(values: Any) -> list[int]:
    out = values.tolist() if hasattr(values, "tolist") else list(values)
    return [int(v) for v in out]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
