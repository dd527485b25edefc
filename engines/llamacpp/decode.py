"""llama.cpp decoding for LlamaCppEngine: prompt prefill with KV prefix reuse, sampling with
per-token logprobs, prompt-lookup drafts verified in one batch, token pieces, and the text side of
one request (Output), shared by the one-at-a-time path and the batch scheduler (llamacpp/batch.py).

Runs only on the engine's thread. `Llama.input_ids[:n_tokens]` always mirrors the KV cache, so
the next request can reuse the longest common prefix (as `Llama.generate` does), or an earlier
prompt's KV from the prefix store (llamacpp/prefix_cache.py) when that shares more.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaSampler

from mlx_serve.engines.ngram_index import NgramIndex
from mlx_serve.engines.speculation_gate import SpeculationGate, StepCosts, shadow_check
from mlx_serve.engines.text.constrained import JsonConstraint
from mlx_serve.engines.text.postprocess import OutputPipeline
from mlx_serve.engines.text.reasoning import ReasoningFormat
from mlx_serve.engines.text.toolcalls import ToolFormat
from mlx_serve.engines.types import Event, Finished, FinishReason, TokenLogprob, Usage
from mlx_serve.profiles.schema import PromptLookup

if TYPE_CHECKING:
    from mlx_serve.engines.llamacpp.prefix_cache import PrefixStore

PENALTY_LAST_N = 64


@dataclass
class DraftStats:
    drafted: int = 0
    accepted: int = 0


@dataclass
class Prepared:
    """One request, templated and tokenized, with everything its decoding needs."""

    model: Any  # the engine's _Model it was prepared for
    tokens: list[int]
    text: str
    stops: tuple[str, ...]
    reasoning: ReasoningFormat | None
    tool_format: ToolFormat | None
    sampling: dict[str, Any]
    budget: int  # completion tokens allowed: max_tokens, capped by the room left in the context
    logprobs: bool
    top_logprobs: int
    constraint: JsonConstraint | None = None  # response_format: masks logits to the JSON grammar


class Output:
    """The text side of one request: sampled tokens -> events, its stop conditions, its Finished."""

    def __init__(self, prep: Prepared, decoder: Decoder) -> None:
        self.pipeline = OutputPipeline(prep.stops, prep.reasoning, prep.tool_format, prep.text)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # pieces may split a character
        self._decoder = decoder
        self.count = 0  # completion tokens, the end-of-generation token included
        self.reason: FinishReason = "length"
        self.done = False

    def push(self, token: int, logprobs: Sequence[TokenLogprob] = ()) -> list[Event]:
        """Events for one sampled token; sets `done` on an end-of-generation token or a stop string."""
        self.count += 1
        if self._decoder.is_eog(token):
            self.reason, self.done = "stop", True
            return []
        events = self.pipeline.feed(self._utf8.decode(self._decoder.piece(token)), logprobs)
        if self.pipeline.stopped:
            self.reason, self.done = "stop", True
        return events

    def finish(self, prompt_tokens: int, cached: int, stats: DraftStats) -> list[Event]:
        """What is still held back, then Finished. An incomplete character at the very end
        (max_tokens hit mid-sequence) is dropped."""
        events = self.pipeline.flush()
        reason = "tool_calls" if self.reason == "stop" and self.pipeline.tool_calls else self.reason
        usage = Usage(prompt_tokens, self.count, cached, stats.drafted, stats.accepted)
        return [*events, Finished(reason, usage, stop_sequence=self.pipeline.matched_stop)]


class Decoder:
    """Decoding state around one `Llama`; `rendered_special` are control tokens shown as text."""

    def __init__(self, llm: llama_cpp.Llama, rendered_special: Iterable[int] = ()) -> None:
        self.llm = llm
        self.rendered_special = frozenset(rendered_special)
        self.step_costs = StepCosts()  # what a drafted token costs on this model (prompt lookup)
        self._pieces: dict[int, bytes] = {}

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def prefill(self, tokens: list[int], store: PrefixStore | None = None) -> int:
        """Decode the prompt, reusing the longest cached prefix: the context's own KV, or an entry
        of the prefix `store` if that shares more; returns the reused token count."""
        llm = self.llm
        held = llm.input_ids[: llm.n_tokens]
        common = common_prefix(held, tokens)
        if store is not None:
            entry, stored = store.match(tokens)
            if entry is not None and stored > common:
                restored = store.swap(0, held, entry)
                llm.input_ids[: len(restored)] = restored
                llm.n_tokens, common = len(restored), stored if restored else 0
            else:
                store.offload(0, held, min(common, len(tokens) - 1))
        common = min(common, len(tokens) - 1)  # decode at least one token: we need fresh logits
        if common and not llm._ctx.kv_cache_seq_rm(-1, common, -1):
            common = 0
        if not common:
            forget_cache(llm)
        llm.n_tokens = common
        decode(llm, tokens[common:], all_logits=False)
        return common

    def tokens(
        self,
        sampler: LlamaSampler,
        prompt: list[int],
        budget: int,
        lookup: PromptLookup | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        stats: DraftStats | None = None,
        constraint: JsonConstraint | None = None,
        argmax: bool = False,
    ) -> Iterator[tuple[int, tuple[TokenLogprob, ...]]]:
        """Up to `budget` sampled tokens with their logprobs, after prefill(prompt).

        With `lookup`, drafts from prompt + output are decoded in one batch and each position is
        sampled in turn; the first sample that differs from the draft ends the run and the rest of
        the draft is dropped from the cache, so the output is what plain decoding would give (bit
        for bit with flash attention; without it llama.cpp's CPU attention rounds a multi-token
        batch differently, enough to fork SmolLM2's greedy text after ~300 characters). A
        SpeculationGate per request drafts only as much as its acceptance and this model's measured
        cost of drafting promise to gain (novel text drafts almost nothing).
        A `constraint` masks each position's logits to its grammar before sampling. `argmax`: pick
        the first maximum instead of running `sampler` (plain_greedy sampling: the same token).
        """
        llm, stats = self.llm, stats or DraftStats()
        gate = SpeculationGate(lookup.min_acceptance, self.step_costs) if lookup is not None else None
        index = NgramIndex(lookup.min_ngram, lookup.max_ngram) if lookup is not None else None
        if index is not None:
            index.extend(prompt)
        produced, proposal, draft = 0, [], []
        while True:
            accepted = 0
            for i in range(len(draft) + 1):
                idx = i if draft else -1  # batch index of the logits that predict this token
                if constraint is not None:
                    constraint.mask_llama_logits(llm, idx)
                token = self.argmax(idx) if argmax else sampler.sample(llm._ctx, idx)
                if constraint is not None:
                    constraint.accept(token)
                if index is not None:
                    index.extend((token,))
                produced += 1
                yield token, (self.token_logprobs(idx, token, top_logprobs) if logprobs else ())
                if produced >= budget:
                    return
                if i < len(draft) and token == draft[i]:
                    stats.accepted += 1
                    accepted += 1
                    continue
                if i < len(draft):  # rejected: drop the unverified rest of the draft from the cache
                    keep = llm.n_tokens - (len(draft) - i)
                    llm._ctx.kv_cache_seq_rm(-1, keep, -1)
                    llm.n_tokens = keep
                break
            if gate is not None:  # drafting pays only while enough of it is accepted
                gate.record(len(draft), accepted, predicted=shadow_check(proposal, draft, token))
            proposal, draft = [], []
            if lookup is not None and index is not None and gate is not None:
                proposal = index.propose(min(lookup.num_pred_tokens, budget - produced - 1, llm.n_batch - 1))
                draft = proposal[: gate.draft_length(len(proposal))]
                stats.drafted += len(draft)
            decode(llm, [token, *draft], all_logits=bool(draft))

    def argmax(self, idx: int) -> int:
        """The first maximum of batch row idx's logits: what a greedy sampler chain without
        penalties picks, in a sixth of the time (its chain fills a candidate array of the vocabulary)."""
        llm = self.llm
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(idx), shape=(llm.n_vocab(),)).argmax())

    def token_logprobs(self, idx: int, token: int, top: int) -> tuple[TokenLogprob, ...]:
        llm = self.llm
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(idx), shape=(llm.n_vocab(),))
        peak = float(logits.max())
        lse = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        best: tuple[tuple[str, float], ...] = ()
        if top > 0:
            ids = np.argpartition(-logits, min(top, logits.size - 1))[:top]
            ids = ids[np.argsort(-logits[ids])]
            best = tuple((self.piece_text(int(i)), float(logits[i]) - lse) for i in ids)
        return (TokenLogprob(self.piece_text(token), min(0.0, float(logits[token]) - lse), best),)

    def piece(self, token: int) -> bytes:
        """The token's bytes; control tokens are empty unless a parser needs to see them."""
        piece = self._pieces.get(token)
        if piece is None:
            special = token in self.rendered_special
            vocab, size = self.llm._model.vocab, 64
            while True:  # llama-cpp-python's own detokenize asserts on pieces over 32 bytes
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
                if n >= 0:
                    break
                size = -n
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def piece_text(self, token: int) -> str:
        return self.piece(token).decode("utf-8", errors="replace")


def make_sampler(llm: llama_cpp.Llama, s: dict[str, Any]) -> LlamaSampler:
    """The sampler chain llama-cpp-python builds: penalties, then greedy or top-k/top-p/min-p/temp/dist."""
    sampler = LlamaSampler()
    sampler.add_penalties(
        n_vocab=llm.n_vocab(),
        penalty_last_n=PENALTY_LAST_N,
        penalty_repeat=s["repetition_penalty"],
        penalty_freq=s["frequency_penalty"],
        penalty_present=s["presence_penalty"],
    )
    if s["temperature"] <= 0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(s["top_k"])
        sampler.add_top_p(s["top_p"], 1)
        sampler.add_min_p(s["min_p"], 1)
        sampler.add_temp(s["temperature"])
        seed = s["seed"]
        sampler.add_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF)
    return sampler


def plain_greedy(s: dict[str, Any]) -> bool:
    """Greedy without penalties: the chain of make_sampler picks the first maximum of the logits."""
    penalties = (s["repetition_penalty"], s["presence_penalty"], s["frequency_penalty"])
    return s["temperature"] <= 0 and penalties == (1, 0, 0)


def decode(llm: llama_cpp.Llama, tokens: list[int], all_logits: bool) -> None:
    """Decode tokens after the cache in batches; logits for the last token (or all, for drafts)."""
    for start in range(0, len(tokens), llm.n_batch):
        chunk = tokens[start : start + llm.n_batch]
        llm._batch.set_batch(chunk, n_past=llm.n_tokens, logits_all=all_logits)
        llm._ctx.decode(llm._batch)
        llm.input_ids[llm.n_tokens : llm.n_tokens + len(chunk)] = chunk
        llm.n_tokens += len(chunk)
    llm._requires_eval = False


def forget_cache(llm: llama_cpp.Llama) -> None:
    llm._ctx.kv_cache_clear()
    llm.n_tokens = 0
    llm._requires_eval = True


def common_prefix(cached: Sequence[int] | np.ndarray, tokens: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    m = min(len(cached), len(tokens))
    if not m:
        return 0
    same = np.asarray(cached[:m], dtype=np.intc) == np.asarray(tokens[:m], dtype=np.intc)
    return m if same.all() else int(np.argmin(same))
