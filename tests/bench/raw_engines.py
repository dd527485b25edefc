"""The engines in-process, with no server around them: the ceiling each server is measured against.

- llama.cpp through llama-cpp-python's low-level C API: one context per batch size, a greedy loop;
  for N sequences, a context with n_seq_max=N and one llama_decode per step for all N (ARCHITECTURE.md "Verified facts":
  `Llama` cannot do this). Its KV cache is split, one stream per sequence (`kv_unified = False`),
  as mlx-serve's engine does (engines/llamacpp/load.use_sequences), so batch-N ratios compare like
  with like; `kv_unified=True` gives the unified-KV unified cache (ARCHITECTURE.md "Verified facts"), reported as an extra row. Flash
  attention is as the engine has it by default (engines/llamacpp/load.flash_attention: off on
  CPU, where it speeds short contexts and slows long ones), not llama.cpp's "auto".
- MLX through mlx-lm: generate_step for one sequence, BatchGenerator (the model's forward on a batch
  of N with a KV cache) for N.

Both take chat-formatted token ids and return one StreamResult per sequence, timed from the call as
a client would time a request (ttft = prefill + first token). Greedy decoding, stopping at the
model's end-of-generation tokens like a server would. MLX is thread-bound (ARCHITECTURE.md "Verified facts"): create,
use and close an MlxRaw on one thread.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from common import StreamResult


class RawEngine(Protocol):
    name: str

    def chat_tokens(self, user: str) -> list[int]: ...

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[StreamResult]: ...

    def prefill_after(self, cached: int, new: int) -> float:
        """Seconds to read `new` prompt tokens after a KV cache already holding `cached`, up to
        the first sampled token: a server's TTFT with a perfect prefix cache, nothing else."""
        ...

    def close(self) -> None: ...


def _render_chat(template: str, user: str, bos: str, eos: str) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user}],
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
    )


def _filler(chat_tokens: Callable[[str], list[int]], n: int) -> list[int]:
    """n ordinary text tokens (attention costs the same whatever they say)."""
    base = chat_tokens("The quick brown fox jumps over the lazy dog. " * 20)
    return (base * (n // len(base) + 1))[:n]


class _Timeline:
    """First and last token times of each sequence, relative to the start of a generate() call."""

    def __init__(self, n: int) -> None:
        self.t0 = time.perf_counter()
        self.first: list[float | None] = [None] * n
        self.last: list[float | None] = [None] * n
        self.count = [0] * n
        self.finish: list[str | None] = [None] * n

    def token(self, i: int) -> None:
        now = time.perf_counter() - self.t0
        if self.first[i] is None:
            self.first[i] = now
        self.last[i], self.count[i] = now, self.count[i] + 1

    def results(self) -> list[StreamResult]:
        return [
            StreamResult(c, f, t, complete=r is not None, finish_reason=r, counted_by="tokens")
            for c, f, t, r in zip(self.count, self.first, self.last, self.finish, strict=True)
        ]


class LlamaRaw:
    """llama.cpp's C API on one model: a context per batch size N (n_seq_max=N, N KV streams of
    n_ctx_per_seq cells each, or one unified cache of N times that)."""

    SPLIT_NAME = "raw llama.cpp"
    UNIFIED_NAME = "raw llama.cpp (unified KV)"

    def __init__(
        self,
        model_path: Path,
        threads: int,
        n_ctx_per_seq: int = 2048,
        kv_unified: bool = False,
        flash_attn: bool = False,
    ) -> None:
        import llama_cpp

        self.lc = llama_cpp
        llama_cpp.llama_backend_init()
        self._silence_logs()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.threads, self.n_ctx_per_seq, self.kv_unified = threads, n_ctx_per_seq, kv_unified
        self.flash_attn = flash_attn
        self.name = self.UNIFIED_NAME if kv_unified else self.SPLIT_NAME
        self._contexts: dict[int, object] = {}

    def _silence_logs(self) -> None:
        lc = self.lc

        @lc.llama_log_callback
        def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            return None

        self._log_cb = _quiet  # keep the callback alive
        lc.llama_log_set(_quiet, ctypes.c_void_p(0))

    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else ""

    def _piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode(errors="replace")

    def chat_tokens(self, user: str) -> list[int]:
        lc = self.lc
        bos, eos = lc.llama_vocab_bos(self.vocab), lc.llama_vocab_eos(self.vocab)
        text = _render_chat(self._meta("tokenizer.chat_template"), user, self._piece(bos), self._piece(eos))
        raw = text.encode()
        out = (lc.llama_token * (len(raw) + 16))()
        n = lc.llama_tokenize(self.vocab, raw, len(raw), out, len(out), False, True)
        if n < 0:
            raise RuntimeError("tokenize overflow")
        return list(out[:n])

    def _context(self, n_seq: int) -> object:
        if n_seq not in self._contexts:
            lc = self.lc
            for ctx in self._contexts.values():  # one context at a time: 8 x 2048 cells are ~370 MB
                lc.llama_free(ctx)
            self._contexts.clear()
            params = lc.llama_context_default_params()
            params.n_ctx = self.n_ctx_per_seq * n_seq
            params.n_batch = max(2048, self.n_ctx_per_seq)
            params.n_ubatch = 512
            params.n_seq_max = n_seq
            params.kv_unified = self.kv_unified
            fa = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.flash_attn_type = fa
            params.n_threads = params.n_threads_batch = self.threads
            ctx = lc.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp cannot create a context for {n_seq} sequences")
            self._contexts[n_seq] = ctx
        return self._contexts[n_seq]

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[StreamResult]:
        lc, n = self.lc, len(prompts)
        ctx = self._context(n)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        size = max(sum(len(p) for p in prompts), n)
        batch = lc.llama_batch_init(size, 0, 1)
        try:
            timeline = _Timeline(n)
            # Prefill every prompt in one batch (chunked to n_batch); logits at each prompt's end.
            entries = [
                (tok, pos, i, pos == len(p) - 1) for i, p in enumerate(prompts) for pos, tok in enumerate(p)
            ]
            rows: dict[int, int] = {}
            for start in range(0, len(entries), 2048):
                chunk = entries[start : start + 2048]
                self._fill(batch, chunk)
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed during prefill")
                rows |= {seq: j for j, (_, _, seq, want) in enumerate(chunk) if want}
            pos = [len(p) for p in prompts]
            live = list(range(n))
            while live:
                step = []
                for seq in live:
                    token = self._argmax(ctx, rows[seq])
                    timeline.token(seq)
                    if lc.llama_vocab_is_eog(self.vocab, token):
                        timeline.count[seq] -= 1  # the end token is not delivered text
                        timeline.finish[seq] = "stop"
                    elif timeline.count[seq] >= max_tokens:
                        timeline.finish[seq] = "length"
                    else:
                        step.append((token, pos[seq], seq, True))
                        pos[seq] += 1
                live = [seq for _, _, seq, _ in step]
                if step:
                    self._fill(batch, step)
                    if lc.llama_decode(ctx, batch) != 0:
                        raise RuntimeError("llama_decode failed during decode")
                    rows = {seq: j for j, (_, _, seq, _) in enumerate(step)}
            return timeline.results()
        finally:
            lc.llama_batch_free(batch)

    def prefill_after(self, cached: int, new: int) -> float:
        lc = self.lc
        ctx = self._context(1)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        tokens = _filler(self.chat_tokens, cached + new)
        batch = lc.llama_batch_init(2048, 0, 1)
        try:
            for start in range(0, cached, 2048):  # the cached prefix: not timed
                chunk = tokens[start : min(cached, start + 2048)]
                self._fill(batch, [(t, start + i, 0, False) for i, t in enumerate(chunk)])
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
            t0 = time.perf_counter()
            for start in range(cached, cached + new, 2048):
                end = min(cached + new, start + 2048)
                self._fill(batch, [(tokens[p], p, 0, p == end - 1) for p in range(start, end)])
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
            self._argmax(ctx, end - 1 - start)  # the first token
            return time.perf_counter() - t0
        finally:
            lc.llama_batch_free(batch)

    @staticmethod
    def _fill(batch: object, entries: list[tuple[int, int, int, bool]]) -> None:
        for j, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[j] = tok
            batch.pos[j] = pos
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = seq
            batch.logits[j] = logits
        batch.n_tokens = len(entries)

    def _argmax(self, ctx: object, row: int) -> int:
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))
        return int(logits.argmax())

    def close(self) -> None:
        for ctx in self._contexts.values():
            self.lc.llama_free(ctx)
        self._contexts.clear()
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None


class MlxRaw:
    """mlx-lm on one model folder: generate_step for batch 1, BatchGenerator for batch N."""

    name = "raw mlx-lm"

    def __init__(self, model_path: Path) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_path))
        self.eos = set(self.tokenizer.eos_token_ids)

    def chat_tokens(self, user: str) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True
            )
        )

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[StreamResult]:
        return self._single(prompts[0], max_tokens) if len(prompts) == 1 else self._batch(prompts, max_tokens)

    def _single(self, prompt: list[int], max_tokens: int) -> list[StreamResult]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        timeline = _Timeline(1)
        for token, _ in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens):
            timeline.token(0)
            if int(token) in self.eos:
                timeline.count[0] -= 1
                timeline.finish[0] = "stop"
                break
        if timeline.finish[0] is None:
            timeline.finish[0] = "length"
        return timeline.results()

    def _batch(self, prompts: list[list[int]], max_tokens: int) -> list[StreamResult]:
        from mlx_lm.generate import BatchGenerator

        n = len(prompts)
        timeline = _Timeline(n)
        gen = BatchGenerator(
            self.model,
            max_tokens=max_tokens,
            stop_tokens=[[t] for t in self.eos],
            completion_batch_size=n,
            prefill_batch_size=n,
        )
        try:
            index = {uid: i for i, uid in enumerate(gen.insert(prompts, [max_tokens] * n))}
            while responses := gen.next_generated():
                for r in responses:
                    i = index[r.uid]
                    timeline.token(i)
                    if r.finish_reason is not None:
                        if r.finish_reason == "stop":
                            timeline.count[i] -= 1
                        timeline.finish[i] = r.finish_reason
        finally:
            gen.close()
        return timeline.results()

    def prefill_after(self, cached: int, new: int) -> float:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        tokens = mx.array(_filler(self.chat_tokens, cached + new))
        cache = make_prompt_cache(self.model)
        if cached:  # the cached prefix: not timed
            self.model(tokens[None, :cached], cache=cache)
            mx.eval([c.state for c in cache])
        t0 = time.perf_counter()
        if new > 1:  # as generate_step: all but the last token fill the cache, the last gives logits
            self.model(tokens[None, cached:-1], cache=cache)
            mx.eval([c.state for c in cache])
        logits = self.model(tokens[None, -1:], cache=cache)
        mx.eval(mx.argmax(logits[0, -1]))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.model = self.tokenizer = None
