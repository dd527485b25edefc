"""Continuous batching for the llama.cpp engine (profile `max_concurrency = N > 1`).

One llama_context holds N sequences, each in its own KV stream (llamacpp.load.use_sequences
explains why not one unified cache); slot i owns sequence id i. The BatchScheduler runs as ONE job
on the engine thread while it has work; with nothing left it returns, so the thread can run other
jobs (unload). Each step it
  1. runs its inbox (thread-safe): new requests are prepared (errors reach only that request) and
     wait FIFO for a slot; `call()` jobs such as count_tokens run here, never behind the streams;
  2. drops cancelled sequences (a client that left is out within a step) and fills free slots;
  3. reads prompt chunks of newly joined sequences, at most PREFILL_SECONDS' worth (by the measured
     prefill rate) while others decode, so a long prompt is read over several steps and running
     streams wait ~0.1 s per step, not seconds (CPU prefill here: ~200 tokens/s); then ONE
     llama_decode of one token per decoding sequence;
  4. samples each sequence from its own batch row with its own sampler chain, JSON constraint,
     logprobs, stop strings and OutputPipeline, and hands all events of the step to the event
     loop in one post to its Handoff (worker.py: one wake-up at most, paced while busy).

Slot choice and prefix reuse across requests (slots and the prefix store): llamacpp/slots.py.

Prompt lookup drafts only while a sequence is alone (with others in the batch, drafts would slow
everyone down) and only as much as its SpeculationGate expects to pay (its acceptance, measured
even while it drafts nothing, against the model's measured cost of a drafted token).

Batched output equals solo output: each sequence's attention runs over its own stream, the same
kernels as alone, and the quantized matmuls are exact per row (SmolLM2 matches bit for bit; the
tiny F32 model within ~1e-5 in logits, F32 matmul tiling). A unified cache would not give this:
its F16 KQ/KQV matmuls tile across the batch rows, enough to fork SmolLM2's greedy text.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import llama_cpp
from llama_cpp._internals import LlamaBatch

import mlx_serve.engines.llamacpp.decode as dec
from mlx_serve.engines.errors import EngineError, EngineNotLoadedError
from mlx_serve.engines.llamacpp.prefix_cache import PrefixStore
from mlx_serve.engines.llamacpp.slots import Slot, Slots
from mlx_serve.engines.ngram_index import NgramIndex
from mlx_serve.engines.speculation_gate import SpeculationGate, shadow_check
from mlx_serve.engines.types import Event, Finished
from mlx_serve.engines.worker import Failure, Receiver, post_by_loop
from mlx_serve.profiles.schema import PromptLookup

T = TypeVar("T")
PREFILL_SECONDS = 0.1  # prompt reading per step while other sequences decode (their added latency)
MIN_CHUNK = 16  # prompt tokens per step at least, however slow the machine
log = logging.getLogger("mlx_serve.engines.llama_cpp")


def _last(item: Any) -> bool:
    return isinstance(item, (Finished, Failure))


@dataclass(frozen=True)
class _Job:
    run: Callable[[], None]  # on the engine thread, between steps; reports its own errors
    fail: Callable[[BaseException], None]  # when the scheduler cannot run it (engine closed)


class _Sequence:
    """One request in the batch."""

    def __init__(self, prep: dec.Prepared, client: Receiver, lookup: PromptLookup | None) -> None:
        self.prep, self.client, self.cancelled = prep, client, client.cancelled
        # With prompt lookup: whether drafting pays for this request, and where drafts come from.
        costs = prep.model.decoder.step_costs
        self.gate = SpeculationGate(lookup.min_acceptance, costs) if lookup else None
        self.index = NgramIndex(lookup.min_ngram, lookup.max_ngram) if lookup else None
        if self.index is not None:
            self.index.extend(prep.tokens)
        self.sampler = dec.make_sampler(prep.model.llm, prep.sampling)
        self.argmax = dec.plain_greedy(prep.sampling)  # the first maximum: what the sampler picks, cheaper
        self.output = dec.Output(prep, prep.model.decoder)
        self.stats = dec.DraftStats()
        self.slot: Slot | None = None
        self.left = False  # finished, failed or cancelled: out of the batch
        self.cached = 0  # prompt tokens reused from the slot's KV
        self.fed = 0  # prompt tokens in the KV cache
        self.next = -1  # the sampled token the next step decodes
        self.proposal: list[int] = []  # what prompt lookup proposed for the next step
        self.draft: list[int] = []  # the part of it the step decodes
        self.rows: range = range(0)  # batch rows holding this sequence's logits after the step

    @property
    def decoding(self) -> bool:
        return self.slot is not None and self.fed == len(self.prep.tokens)


class BatchScheduler:
    def __init__(
        self,
        thread: Any,  # worker.EngineThread
        llm: llama_cpp.Llama,
        lookup: PromptLookup | None,
        count: Callable[[int], None],  # called with the number of tokens sampled
        prefixes: PrefixStore | None = None,  # earlier prompts' KV beyond what the slots hold
    ) -> None:
        self._thread, self.llm, self._lookup, self._count = thread, llm, lookup, count
        self._capacity = llm.n_batch  # tokens per llama_decode (the context's n_batch)
        self._batch = LlamaBatch(n_tokens=self._capacity, embd=0, n_seq_max=1, verbose=False)
        self._slots = Slots(llm, prefixes)
        self._seqs: list[_Sequence] = []  # in arrival order; those without a slot are waiting
        self._inbox: deque[_Job] = deque()
        self._lock = threading.Lock()
        self._active, self._closed, self._steps = False, False, 0  # active: a _run job is queued or running
        self._prefill_rate = 640.0  # prompt tokens per second, measured (a first guess: 64 per step)
        self._tasks: set[asyncio.Future[None]] = set()
        self._outbox: list[tuple[Receiver, Any]] = []  # events of this step, handed over by _flush
        self._alone = False  # this step decodes one sequence: it may draft, its timing is its own

    # ---- the asyncio side --------------------------------------------------------------------

    async def stream(self, prepare: Callable[[], dec.Prepared]) -> AsyncIterator[Event]:
        """Events of one request; `prepare` runs on the engine thread (its errors are raised here
        before any event). Closing the iterator cancels the request at the next step."""
        client = Receiver.here()
        self._submit(
            _Job(
                lambda: self._admit(prepare, client),
                lambda exc: post_by_loop([(client, Failure(exc))], _last),
            )
        )
        try:
            while True:
                item = await client.queue.get()
                if isinstance(item, Failure):
                    raise item.exc
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            client.cancelled.set()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the engine thread between two steps and await its result."""
        future: Future[T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)

        self._submit(_Job(run, lambda exc: future.done() or future.set_exception(exc)))
        return await asyncio.wrap_future(future)

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._inbox.append(job)
            if self._active:
                return  # the running job takes it at its next step
            self._active = True
        task = asyncio.ensure_future(self._thread.call(self._run))
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is None:  # _run never raises: an error means the job never ran (thread closed)
            return
        with self._lock:
            self._active, jobs, self._inbox = False, self._inbox, deque()
        for job in jobs:
            job.fail(exc)

    # ---- the engine thread ---------------------------------------------------------------------

    def held_sequences(self) -> list[tuple[int, list[int]]]:
        """(sequence id, tokens whose KV it holds) per slot; engine thread, between steps."""
        return self._slots.held_sequences()

    def close(self) -> None:
        """Free the batch; runs on the engine thread before the model is freed."""
        self._closed = True
        for seq in self._seqs:
            post_by_loop([(seq.client, Failure(EngineNotLoadedError("the model was unloaded")))], _last)
            seq.sampler.close()
        self._seqs.clear()
        self._batch.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                jobs, self._inbox = self._inbox, deque()
            for job in jobs:  # after close(), nothing runs: the model is gone
                job.fail(EngineNotLoadedError("the model was unloaded")) if self._closed else job.run()
            for seq in self._seqs:
                if seq.cancelled.is_set():  # its KV stays in its slot for prefix reuse
                    self._release(seq)
            self._seqs = [seq for seq in self._seqs if not seq.left]
            for seq in self._seqs:
                if seq.slot is None and not self._take_slot(seq):
                    break  # all slots busy: the rest keep waiting, in order
            if not any(seq.slot for seq in self._seqs):
                self._flush()
                with self._lock:
                    if not self._inbox:
                        self._active = False
                        return
                continue
            try:
                self._step()
            except Exception as exc:  # the context is in an unknown state: fail the running batch
                log.exception("llama.cpp batch step failed")
                for seq in self._seqs:
                    if seq.slot is not None:
                        self._release(seq, Failure(exc))
                self._slots.forget_all()
            self._seqs = [seq for seq in self._seqs if not seq.left]
            self._flush()

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop."""
        post_by_loop(self._outbox, _last)
        self._outbox.clear()

    def _admit(self, prepare: Callable[[], dec.Prepared], client: Receiver) -> None:
        try:
            prep = prepare()
            if prep.model.llm is not self.llm:
                raise EngineNotLoadedError("the model was reloaded")
            self._seqs.append(_Sequence(prep, client, self._lookup))
        except BaseException as exc:
            self._outbox.append((client, Failure(exc)))

    def _take_slot(self, seq: _Sequence) -> bool:
        """Seat `seq` in a free slot (llamacpp/slots.py chooses it); False when all are busy."""
        slot = self._slots.assign(seq.prep.tokens)
        if slot is None:
            return False
        seq.slot, seq.cached, seq.fed = slot, len(slot.cached), len(slot.cached)
        return True

    def _release(self, seq: _Sequence, failure: Failure | None = None) -> None:
        """Take `seq` out of the batch (after a failure: with the KV of its slot)."""
        if failure is not None:
            self._outbox.append((seq.client, failure))
        seq.sampler.close()
        seq.left = True
        if seq.slot is not None:
            if failure is not None:
                self._slots.trim(seq.slot, 0)
            self._slots.release(seq.slot, self._steps)
            seq.slot = None

    def _step(self) -> None:
        """Prompt chunks of newly joined sequences, one llama_decode each, so a prompt is read in
        the pieces it is read in alone (llama.cpp splits a mixed batch per sequence anyway); then
        one llama_decode for every decoding sequence: its last token (and a draft when alone)."""
        self._steps += 1
        running = [seq for seq in self._seqs if seq.slot is not None]
        decoding = [seq for seq in running if seq.decoding]
        room = max(MIN_CHUNK, int(self._prefill_rate * PREFILL_SECONDS)) if decoding else self._capacity
        for seq in [seq for seq in running if not seq.decoding]:  # in arrival order
            if room > 0:
                start = time.perf_counter()
                chunk = seq.prep.tokens[seq.fed : seq.fed + min(room, self._capacity)]
                seq.fed, room = seq.fed + len(chunk), room - len(chunk)
                done = seq.fed == len(seq.prep.tokens)  # logits at the end of the prompt: first sample
                self._batch_of({seq: chunk}, len(chunk) - 1 if done else len(chunk))
                if len(chunk) >= MIN_CHUNK:
                    rate = len(chunk) / max(time.perf_counter() - start, 1e-6)
                    self._prefill_rate = (self._prefill_rate + rate) / 2
        self._alone = len(self._seqs) == 1
        for seq in decoding:
            seq.proposal, seq.draft = self._draft(seq) if self._lookup else ([], [])
        if decoding:
            self._batch_of({seq: [seq.next, *seq.draft] for seq in decoding}, 0)

    def _batch_of(self, tokens: dict[_Sequence, list[int]], logits_from: int) -> None:
        """Decode each sequence's tokens after its cache in one llama_decode, with logits for
        tokens[logits_from:], then sample the sequences that have some."""
        entries: list[tuple[int, int, int, bool]] = []  # (token, position, sequence id, logits?)
        for seq, toks in tokens.items():
            assert seq.slot is not None
            slot, start, base = seq.slot, len(entries), len(seq.slot.cached)
            entries += [(t, base + i, slot.seq_id, i >= logits_from) for i, t in enumerate(toks)]
            slot.cached += toks
            seq.rows = range(start + logits_from, len(entries))  # the batch rows of its logits
        self._decode(entries)
        for seq in tokens:
            if seq.rows:
                try:
                    self._sample(seq)
                except Exception as exc:  # e.g. the JSON grammar rejected a token: this request only
                    self._release(seq, Failure(exc))

    def _draft(self, seq: _Sequence) -> tuple[list[int], list[int]]:
        """(what prompt lookup proposes, what the step drafts): the gate sees every proposal,
        drafted or not; only a sequence alone in the batch drafts."""
        lookup = self._lookup
        assert lookup is not None and seq.gate is not None
        room = min(lookup.num_pred_tokens, seq.prep.budget - seq.output.count - 1, self._capacity - 1)
        if room <= 0:
            return [], []
        assert seq.index is not None
        proposal = seq.index.propose(room)
        draft = proposal[: seq.gate.draft_length(len(proposal))] if self._alone else []
        seq.stats.drafted += len(draft)
        return proposal, draft

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self._batch.batch
        for j, (token, pos, seq_id, logits) in enumerate(entries):
            batch.token[j], batch.pos[j], batch.logits[j] = token, pos, logits
            batch.n_seq_id[j], batch.seq_id[j][0] = 1, seq_id
        batch.n_tokens = len(entries)
        code = llama_cpp.llama_decode(self.llm.ctx, batch)
        if code != 0:
            raise EngineError(f"llama_decode returned {code}")

    def _sample(self, seq: _Sequence) -> None:
        """Sample the sequence's rows in turn: one token, or a verified run of its draft (the first
        sample that differs from the draft ends it; the rest of the draft leaves the cache)."""
        assert seq.slot is not None
        prep, out, ctx = seq.prep, seq.output, self.llm._ctx
        i, token, accepted = 0, -1, 0
        for i, row in enumerate(seq.rows):
            if prep.constraint is not None:
                prep.constraint.mask_llama_logits(self.llm, row)
            if seq.argmax:
                token = prep.model.decoder.argmax(row)
            else:
                token = seq.sampler.sample(ctx, row)
            if prep.constraint is not None:
                prep.constraint.accept(token)
            self._count(1)
            if seq.index is not None:
                seq.index.extend((token,))
            top, decoder = prep.top_logprobs, prep.model.decoder
            events = out.push(token, decoder.token_logprobs(row, token, top) if prep.logprobs else ())
            self._outbox += [(seq.client, event) for event in events]
            out.done = out.done or out.count >= prep.budget
            if out.done or i >= len(seq.draft) or token != seq.draft[i]:
                break
            seq.stats.accepted += 1
            accepted += 1
        if seq.gate is not None:
            predicted = shadow_check(seq.proposal, seq.draft, token)
            seq.gate.record(len(seq.draft), accepted, predicted, timed=self._alone)
        self._slots.trim(seq.slot, len(seq.slot.cached) - len(seq.rows) + 1 + i)  # unverified draft tokens
        seq.next = token
        if out.done:
            events = out.finish(len(prep.tokens), seq.cached, seq.stats)
            self._outbox += [(seq.client, event) for event in events]
            self._release(seq)
