"""Prompt material: stories and long documents (issue 10's workloads); a long shared system prompt,
chat turns, a code file an editor completes at moving cursors, a function to rewrite (issue 11's).
Everything is deterministic per `run` and differs between runs from its first line on, so no cache
carries one run into the next.

Sizes are in tokens of SmolLM2's tokenizer (every model family here shares it), counted with a
`count(text) -> int` the caller supplies.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raw_engines import RawEngine

TOPICS = (
    "a dragon who learns to bake bread", "a lighthouse keeper during a winter storm",
    "a robot exploring an abandoned city", "two friends sailing around the world",
    "a young wizard's first day at school", "a detective solving a mystery in Paris",
    "a family of foxes in an old forest", "an astronaut stranded on Mars",
    "a musician who lost her voice", "a village that disappears every night",
    "a cat who becomes mayor of a small town", "a knight afraid of the dark",
    "a scientist who discovers a new color", "a boy who can talk to trees",
    "a pirate searching for a lost map", "a baker who opens a shop on the moon",
)  # fmt: skip
WORDS = (
    "river mountain quiet garden window letter morning silver bridge harvest lantern meadow "
    "journey whisper forest candle ocean market thunder pebble harbor orchard shadow valley "
    "compass feather meadow station blanket library engine castle puzzle kettle village"
).split()


def story(run: int, stream: int) -> str:
    """A prompt that makes SmolLM2 write long; distinct per (run, stream) from its first token."""
    topic = TOPICS[(run * 8 + stream) % len(TOPICS)]
    return f"Story {run}-{stream}: write a long, detailed story about {topic}."


def long_prompt(run: int, target_tokens: int, raw: RawEngine) -> tuple[str, int]:
    """A ~target_tokens chat prompt (counted with the model's own template), different every run."""
    rng = random.Random(run)
    n = target_tokens // 2
    for _ in range(4):
        words = [rng.choice(WORDS) for _ in range(n)]
        text = f"Document {run}: " + " ".join(words) + "\nSummarize the document above in one sentence."
        count = len(raw.chat_tokens(text))
        if abs(count - target_tokens) <= target_tokens * 0.02:
            break
        n = max(1, round(n * target_tokens / count))
    return text, count


NOUNS = "sum mean spread peak floor count weight score total range".split()
Count = Callable[[str], int]


def _grow(make: Callable[[int], str], target: int, count: Count, start: int = 8) -> str:
    """The smallest make(n) with at least `target` tokens (n grows geometrically, then by one)."""
    n = start
    while count(make(n)) < target:
        n = max(n + 1, round(n * 1.3))
    return make(n)


def shared_system_prompt(run: int, target_tokens: int, count: Count) -> str:
    """A long system prompt (project guidelines), like agents resend every turn."""

    def make(n: int) -> str:
        rng = random.Random(f"system-{run}")  # the same rules for every n: make(n) extends make(n - 1)
        rules = [
            f"Rule {i}: keep the {rng.choice(WORDS)} and the {rng.choice(WORDS)} apart from the "
            f"{rng.choice(WORDS)}."
            for i in range(n)
        ]
        return f"Guidelines {run} for this project.\n" + "\n".join(rules)

    return _grow(make, target_tokens, count)


def question(run: int, k: int) -> str:
    return f"Question {run}.{k}: which rule mentions the word {WORDS[(run * 7 + k) % len(WORDS)]}?"


def chat_turn(run: int, turn: int, words: int) -> str:
    """The user's `turn`-th message (from 1) of conversation `run`: some new notes and a question."""
    rng = random.Random(f"turn-{run}-{turn}")
    notes = " ".join(rng.choice(WORDS) for _ in range(words))
    head = f"Conversation {run}. " if turn == 1 else ""
    return f"{head}Notes for turn {turn}: {notes}. Which of these words name places? Answer briefly."


def _function(rng: random.Random, i: int) -> str:
    name, noun = f"{rng.choice(WORDS)}_{rng.choice(NOUNS)}_{i}", rng.choice(NOUNS)
    return (
        f"def {name}(values: list[int], factor: int = {i % 7 + 2}) -> int:\n"
        f'    """Return the {noun} of the values that divide by {i % 5 + 2}, scaled by factor."""\n'
        f"    total = 0\n"
        f"    for index, value in enumerate(values):\n"
        f"        if value % {i % 5 + 2} == 0:\n"
        f"            total += value * factor\n"
        f"        else:\n"
        f"            total -= index\n"
        f"    return total\n"
    )


def code_file(run: int, target_tokens: int, count: Count) -> str:
    """A Python module of small functions, about `target_tokens` long."""

    def make(n: int) -> str:
        rng = random.Random(f"code-{run}")
        body = "\n\n".join(_function(rng, i) for i in range(n))
        return f'"""Module {run}: helpers for the {WORDS[run % len(WORDS)]} report."""\n\n{body}'

    return _grow(make, target_tokens, count, start=4)


@dataclass(frozen=True)
class Edit:
    """One FIM request of an editor session: the text before and after the cursor."""

    prefix: str
    suffix: str


def fim_session(text: str, edits: int, run: int) -> list[Edit]:
    """An editor session on `text`: the user types a line at a cursor a few lines further down each
    time (now and then jumping back), keeping what was typed, and the editor asks for a completion
    at the cursor with the whole file around it."""
    rng = random.Random(f"fim-{run}")
    lines = text.split("\n")
    cursor = len(lines) // 3
    out = []
    for k in range(edits):
        typed = f"    check_{k} = "  # the user starts a line; the completion finishes it
        lines.insert(cursor, typed)
        before = "\n".join(lines[:cursor] + [typed])
        out.append(Edit(before, "\n" + "\n".join(lines[cursor + 1 :])))
        step = rng.choice((2, 3, 4, 5, -12)) if k % 4 == 3 else rng.choice((2, 3, 4, 5))
        cursor = min(max(2, cursor + 1 + step), len(lines) - 1)
    return out


def echo_prompt(run: int) -> str:
    """Code-edit echo: the model rewrites a function given in the prompt, most of it unchanged."""
    source = _function(random.Random(f"echo-{run}"), run + 3)
    return (
        f"Task {run}: rewrite this Python function, renaming the variable `total` to `result`. "
        "Keep everything else exactly as it is and reply with the code only.\n\n"
        f"```python\n{source}```"
    )


def novel_prompt(run: int) -> str:
    """Novel text: nothing in the prompt to copy from."""
    topics = ("a lighthouse keeper in a storm", "a robot in an abandoned city", "a fox family in winter")
    return f"Story {run}: write a long, detailed story about {topics[run % len(topics)]}."
