"""Incremental prompt tokenization gives exactly the ids of tokenizing the whole prompt, with the
real tokenizers of both engines, and tokenizes only the new part of a growing conversation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_serve.engines.llamacpp.prompt import control_tokens
from mlx_serve.engines.text.prompt_tokens import MIN_CHARS, PromptTokenizer, hf_special_tokens

WORDS = "alpha beta  gamma\tdelta, épsilon 東京 naïve\n\n  <not special> ending. ".split(" ")


def turn(k: int, words: int = 60) -> str:
    return " ".join(WORDS[(k * 7 + i) % len(WORDS)] for i in range(words)) + f" #{k}"


def chat(messages: list[tuple[str, str]]) -> str:
    """ChatML as SmolLM2's template renders it (the engines' templates are tested elsewhere)."""
    return (
        "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in messages)
        + "<|im_start|>assistant\n"
    )


class Recorder:
    """The plain encode, counting the characters it was given."""

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.encode, self.chars = encode, 0

    def __call__(self, text: str) -> list[int]:
        self.chars += len(text)
        return self.encode(text)


@pytest.fixture(scope="module", params=["hugging face", "llama.cpp"])
def tokenizer(
    request: pytest.FixtureRequest, tiny_mlx: Path, smollm2_gguf: Path
) -> Iterator[tuple[Callable, dict]]:
    """(encode: text -> ids with special tokens parsed and nothing added, special tokens)."""
    if request.param == "hugging face":
        hf = load_tokenizer(tiny_mlx)
        yield (lambda text: list(hf.encode(text, add_special_tokens=False))), hf_special_tokens(hf)
    else:
        llm = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
        vocab = [llm.detokenize([i], special=True).decode("utf-8", "replace") for i in range(llm.n_vocab())]
        yield (
            (lambda text: llm.tokenize(text.encode(), add_bos=False, special=True)),
            control_tokens(llm, vocab),
        )
        llm.close()


def test_a_growing_conversation_tokenizes_only_its_new_turns(tokenizer: tuple[Callable, dict]) -> None:
    encode, specials = tokenizer
    assert "<|im_start|>" in specials
    recorder = Recorder(encode)
    prompts = PromptTokenizer(recorder, specials)
    messages: list[tuple[str, str]] = [("system", turn(0, 900))]
    whole = 0
    for k in range(1, 9):
        messages.append(("user", turn(k)))
        text = chat(messages)
        assert prompts.encode(text) == encode(text), k
        whole += len(text)
        messages.append(("assistant", turn(100 + k)))
    assert recorder.chars < whole / 3  # the history was not tokenized again


def test_edits_anywhere_give_the_whole_prompts_ids(tokenizer: tuple[Callable, dict]) -> None:
    """Edited history, special strings inside a message, whitespace next to special tokens, text
    cut inside a special token: the ids are always those of tokenizing the whole prompt."""
    encode, specials = tokenizer
    prompts = PromptTokenizer(encode, specials)
    base = [("system", turn(0, 900)), ("user", turn(1)), ("assistant", turn(2)), ("user", turn(3))]
    variants = [
        chat(base),
        chat([*base[:2], ("assistant", turn(2) + " <|im_end|> quoted"), base[3]]),
        chat([*base[:2], ("assistant", "  " + turn(2) + "\n\n"), base[3]]),
        chat([base[0], ("user", turn(1).upper()), *base[2:]]),
        chat(base)[: chat(base).rindex("<|im_start|>") + 5],  # ends inside a special token
        chat(base) + "<|im_end|>\n<|im_start|>user\nmore",
        chat([("system", turn(0, 900) + " tail")]),
    ]
    for text in variants + variants[::-1]:
        assert prompts.encode(text) == encode(text)


def test_ids_that_do_not_line_up_with_the_text_are_never_reused() -> None:
    """A tokenizer that does not parse special strings: nothing lines up, every prompt is whole."""
    recorder = Recorder(lambda text: [ord(c) for c in text])
    prompts = PromptTokenizer(recorder, {"<|im_start|>": 1, "<|im_end|>": 2})
    text = chat([("system", "x" * MIN_CHARS)])
    for extra in ("", "more", "more and more"):
        assert prompts.encode(text + extra) == [ord(c) for c in text + extra]
    assert recorder.chars == 3 * len(text) + len("more") + len("more and more")


def test_short_prompts_are_not_remembered() -> None:
    recorder = Recorder(lambda text: [ord(c) for c in text])
    prompts = PromptTokenizer(recorder, {"<": 1})
    prompts.encode("<a")
    prompts.encode("<a<b")
    assert recorder.chars == len("<a") + len("<a<b")
