"""Constrained JSON decoding (engines/text/constrained.py) on real models, with our own greedy loops.

The tiny models are random: unconstrained, their output is gibberish that never parses, so a parsing,
schema-valid result that ends in EOS is the constraint's doing. A random model never closes an
unbounded string, so its schema bounds `name` (maxLength) and `age` (maximum); the real SmolLM2 gets
the unbounded schema. MLX loops use mlx-lm's generate_step / speculative_generate_step and our
prompt_lookup_generate_step with the constraint as a logits processor; llama.cpp loops use
Llama.generate with a LogitsProcessorList, and the explicit mask_llama_logits + accept style the
engine's own Decoder uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import llama_cpp
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from llama_cpp import Llama, LogitsProcessorList
from llama_cpp._internals import LlamaSampler
from mlx_lm.generate import generate_step, speculative_generate_step

from mlx_serve.engines.errors import EngineError, UnsupportedRequestError
from mlx_serve.engines.mlx.prompt_lookup import DraftCounters, prompt_lookup_generate_step
from mlx_serve.engines.text.constrained import JsonConstraint, grammar_for, llama_tokenizer, mlx_tokenizer

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
BOUNDED_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PROMPT = "Give me a person as JSON:"
MAX_TOKENS = 200  # the bounded schema ends in well under 100 tokens on the tiny model


# ---- fixtures: one load per model for the whole module --------------------------------------
@pytest.fixture(scope="module")
def mlx_tiny(tiny_mlx: Path):
    model, tokenizer = mlx_lm.load(str(tiny_mlx))
    return model, tokenizer


@pytest.fixture(scope="module")
def llama_tiny(tiny_gguf: Path):
    llm = Llama(str(tiny_gguf), n_ctx=512, n_threads=2, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def llama_smol(smollm2_gguf: Path):
    llm = Llama(str(smollm2_gguf), n_ctx=512, n_threads=2, verbose=False)
    yield llm
    llm.close()


def mlx_greedy(
    model, tokenizer, constraint, steps=generate_step, processors=(), **kw
) -> tuple[list[int], bool]:
    """Greedy tokens until EOS (excluded) or MAX_TOKENS, and whether EOS ended it."""
    prompt = mx.array(tokenizer.encode(PROMPT), mx.uint32)
    procs = [*processors, constraint] if constraint is not None else list(processors)
    out: list[int] = []
    for step in steps(prompt, model, max_tokens=MAX_TOKENS, logits_processors=procs, **kw):
        token = step[0]
        if token in tokenizer.eos_token_ids:
            return out, True
        out.append(token)
    return out, False


def llama_is_eog(llm: Llama, token: int) -> bool:
    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def llama_generate(llm: Llama, prompt: str, constraint: JsonConstraint, max_tokens: int = MAX_TOKENS):
    """Llama.generate at temperature 0 with the constraint as its logits processor."""
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    out: list[int] = []
    for token in llm.generate(tokens, temp=0.0, logits_processor=LogitsProcessorList([constraint])):
        if llama_is_eog(llm, token):
            return llm.detokenize(out).decode(), True
        out.append(token)
        if len(out) >= max_tokens:
            break
    return llm.detokenize(out).decode(), False


def chatml(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


# ---- grammars --------------------------------------------------------------------------------
def test_grammar_for_modes():
    assert grammar_for(None) is None
    assert grammar_for({"type": "text"}) is None
    assert isinstance(grammar_for({"type": "json_object"}), str)
    assert isinstance(grammar_for({"type": "json_schema", "schema": PERSON}), str)
    # the OpenAI wire shape is accepted too
    assert isinstance(
        grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}), str
    )


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "wat"}, "Invalid type"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "Unsatisfiable"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not exist"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ],
)
def test_invalid_schema_is_unsupported(schema, reason, mlx_tiny):
    with pytest.raises(UnsupportedRequestError, match=reason):
        grammar_for({"type": "json_schema", "schema": schema})
    with pytest.raises(UnsupportedRequestError, match="not supported"):
        JsonConstraint.for_mlx(mlx_tiny[1], {"type": "json_schema", "schema": schema})


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_schema"}, {"type": "json_schema", "schema": "nope"}, {"type": "xml"}],
)
def test_malformed_response_format_is_unsupported(response_format):
    with pytest.raises(UnsupportedRequestError):
        grammar_for(response_format)


def test_no_constraint_for_plain_text(mlx_tiny, llama_tiny):
    assert JsonConstraint.for_mlx(mlx_tiny[1], None) is None
    assert JsonConstraint.for_llama(llama_tiny, {"type": "text"}) is None


def test_tokenizers_are_cached_per_object(mlx_tiny, llama_tiny):
    assert mlx_tokenizer(mlx_tiny[1]) is mlx_tokenizer(mlx_tiny[1])
    assert llama_tokenizer(llama_tiny) is llama_tokenizer(llama_tiny)
    assert set(mlx_tokenizer(mlx_tiny[1]).eos_tokens) == set(mlx_tiny[1].eos_token_ids)
    assert all(llama_is_eog(llama_tiny, t) for t in llama_tokenizer(llama_tiny).eos_tokens)


def test_accept_rejects_a_token_the_grammar_forbids(mlx_tiny):
    tokenizer = mlx_tiny[1]
    constraint = JsonConstraint.for_mlx(tokenizer, {"type": "json_object"})
    assert not constraint.allowed()[tokenizer.encode("hello")[0]]
    with pytest.raises(EngineError, match="rejected"):
        constraint.accept(tokenizer.encode("hello")[0])


# ---- MLX -------------------------------------------------------------------------------------
def test_mlx_tiny_random_model_emits_valid_json(mlx_tiny):
    model, tokenizer = mlx_tiny
    free, _ = mlx_greedy(model, tokenizer, None)
    with pytest.raises(ValueError):  # the random model's own output is not JSON
        json.loads(tokenizer.decode(free))

    constraint = JsonConstraint.for_mlx(tokenizer, {"type": "json_schema", "schema": BOUNDED_PERSON})
    out, ended = mlx_greedy(model, tokenizer, constraint)
    assert ended and constraint.is_finished(), "the constraint must force EOS once the JSON is complete"
    value = json.loads(tokenizer.decode(out))
    jsonschema.validate(value, BOUNDED_PERSON)


def test_mlx_padded_vocab_is_masked(mlx_tiny):
    """Logits wider than the tokenizer (padded embeddings): the padding ids are never sampled, even
    when they score highest."""
    model, tokenizer = mlx_tiny

    def pad(tokens, logits):  # 64 padding ids that would win greedy decoding
        return mx.concatenate([logits, mx.full((logits.shape[0], 64), 1e4, logits.dtype)], axis=-1)

    constraint = JsonConstraint.for_mlx(tokenizer, {"type": "json_schema", "schema": BOUNDED_PERSON})
    out, ended = mlx_greedy(model, tokenizer, constraint, processors=[pad])
    assert ended and max(out) < len(tokenizer.vocab)
    jsonschema.validate(json.loads(tokenizer.decode(out)), BOUNDED_PERSON)

    row = np.zeros(mlx_tokenizer(tokenizer).vocab_size + 10, np.float32)
    masked = constraint.mask_logits(row)
    assert masked is row and np.isneginf(row[-10:]).all()  # numpy rows are masked in place


def test_mlx_drafting_generators_match_plain_decoding(mlx_tiny):
    """Speculative decoding (the tiny model drafting for itself) and prompt lookup call the processor
    with drafts and then drop rejected ones: the constraint follows the history, rolling back."""
    model, tokenizer = mlx_tiny
    fmt = {"type": "json_schema", "schema": BOUNDED_PERSON}
    plain, _ = mlx_greedy(model, tokenizer, JsonConstraint.for_mlx(tokenizer, fmt))

    spec_c = JsonConstraint.for_mlx(tokenizer, fmt)
    spec, ended = mlx_greedy(
        model,
        tokenizer,
        spec_c,
        steps=lambda p, m, **kw: speculative_generate_step(p, m, model, num_draft_tokens=3, **kw),
    )
    assert ended and spec == plain

    lookup_c, drafts = JsonConstraint.for_mlx(tokenizer, fmt), DraftCounters()
    lookup, ended = mlx_greedy(
        model,
        tokenizer,
        lookup_c,
        steps=lambda p, m, **kw: prompt_lookup_generate_step(p, m, num_pred_tokens=4, counters=drafts, **kw),
    )
    assert ended and lookup == plain
    assert drafts.drafted > drafts.accepted  # some drafts were rejected: the constraint rolled back


# ---- llama.cpp -------------------------------------------------------------------------------
def test_llama_tiny_random_model_emits_valid_json(llama_tiny):
    constraint = JsonConstraint.for_llama(llama_tiny, {"type": "json_schema", "schema": BOUNDED_PERSON})
    text, ended = llama_generate(llama_tiny, PROMPT, constraint)
    assert ended and constraint.is_finished()
    jsonschema.validate(json.loads(text), BOUNDED_PERSON)


def test_llama_explicit_mask_and_accept(llama_tiny):
    """The engine-Decoder style: mask the context's logits in place, sample with a LlamaSampler chain
    (penalties + greedy, as llamacpp.decode.make_sampler builds it), accept, stop when finished."""
    llm = llama_tiny
    constraint = JsonConstraint.for_llama(llm, {"type": "json_schema", "schema": BOUNDED_PERSON})
    sampler = LlamaSampler()
    sampler.add_penalties(
        n_vocab=llm.n_vocab(), penalty_last_n=64, penalty_repeat=1.3, penalty_freq=0.0, penalty_present=0.0
    )
    sampler.add_greedy()
    llm.reset()
    llm.eval(llm.tokenize(PROMPT.encode(), add_bos=False))
    out: list[int] = []
    for _ in range(MAX_TOKENS):
        constraint.mask_llama_logits(llm, -1)
        token = sampler.sample(llm._ctx, -1)
        assert not llama_is_eog(llm, token)  # is_finished() stops us before EOS is needed
        constraint.accept(token)
        out.append(token)
        if constraint.is_finished():
            break
        llm.eval([token])
    assert constraint.is_finished()
    jsonschema.validate(json.loads(llm.detokenize(out).decode()), BOUNDED_PERSON)
    sampler.close()


def test_llama_smollm2_follows_the_schema(llama_smol):
    """The real model with the unbounded schema: it names a person and ends on its own."""
    constraint = JsonConstraint.for_llama(llama_smol, {"type": "json_schema", "schema": PERSON})
    text, ended = llama_generate(
        llama_smol,
        chatml("Give me a JSON object describing a person with a name and an age."),
        constraint,
        80,
    )
    assert ended and constraint.is_finished()
    jsonschema.validate(json.loads(text), PERSON)


def test_llama_smollm2_json_object(llama_smol):
    constraint = JsonConstraint.for_llama(llama_smol, {"type": "json_object"})
    text, ended = llama_generate(
        llama_smol, chatml("Return a JSON object with the keys city and country for Paris."), constraint, 80
    )
    assert ended and constraint.is_finished()
    assert isinstance(json.loads(text), dict)
