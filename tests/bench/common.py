"""Shared types of the benchmark harness: one stream's outcome, run settings, and the model files.

Every other harness module imports this one; it imports none of them but fim_model (a model builder).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fim_model import build_smollm2_fim_gguf

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent


@dataclass(frozen=True)
class StreamResult:
    """One generation as a client saw it. Times are seconds from the moment the request was sent.

    tokens: tokens actually delivered (usage.completion_tokens when the server reports it, else
    content chunks). complete: the stream ended with a finish reason (stop or length) rather than
    being cut short (llama_cpp.server ends interrupted streams with [DONE] and no finish reason).
    """

    tokens: int
    ttft: float | None
    t_last: float | None
    complete: bool
    error: str | None = None
    finish_reason: str | None = None
    counted_by: str = "usage"
    text: str = ""  # the content delivered (multi-turn chat sends it back; prompt lookup compares it)
    prompt_tokens: int | None = None  # usage.prompt_tokens, when reported
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first one: the engine's decode speed, prefill excluded."""
        if self.tokens < 2 or self.ttft is None or self.t_last is None or self.t_last <= self.ttft:
            return None
        return (self.tokens - 1) / (self.t_last - self.ttft)


@dataclass(frozen=True)
class Settings:
    """What a workload needs to know about this run."""

    smoke: bool
    runs: int
    max_tokens: int
    concurrency: tuple[int, ...]
    prefill_tokens: int
    idle_window: float
    threads: int
    # SmolLM2 on the MLX CPU backend runs ~6 tok/s: fewer tokens there; 0 = skip it (smoke)
    mlx_real_max_tokens: int
    # issue 11 (editor and cache workloads); prefill_tokens above sizes their long prompts and files
    turns: int = 10  # multi-turn chat: turns per conversation
    turn_words: int = 60  # words of new text in each user turn
    turn_max_tokens: int = 48  # reply length per turn
    fim_edits: int = 10  # FIM requests per editor session
    fim_max_tokens: int = 16
    echo_max_tokens: int = 256  # code-edit echo and novel text (prompt lookup on/off)
    chat_streams: int = 4  # chat streams running while FIM is measured
    reloads: int = 20  # profile edits during steady streaming
    reload_interval: float = 1.5  # seconds between those edits

    @classmethod
    def make(cls, smoke: bool, runs: int | None, threads: int | None) -> Settings:
        cores = threads or physical_cores()
        if smoke:
            return cls(
                True, runs or 1, 8, (1, 2), 200, 2.0, cores, 0,
                turns=3, turn_words=12, turn_max_tokens=4, fim_edits=3, fim_max_tokens=4,
                echo_max_tokens=16, chat_streams=2, reloads=2, reload_interval=0.5,
            )  # fmt: skip
        return cls(False, runs or 3, 128, (1, 2, 4, 8), 1500, 60.0, cores, 32)


@dataclass(frozen=True)
class Models:
    smollm2_gguf: Path
    smollm2_mlx: Path
    tiny_mlx: Path
    smollm2_fim_gguf: Path  # SmolLM2 with FIM tokens (fim_model.py), for the editor workloads
    tiny_fim_gguf: Path  # the tiny random model with FIM tokens (MLX editor workloads load it as GGUF)


@dataclass
class Figure:
    """One measured quantity of one system: every run's value, summarized as median and range."""

    workload: str
    case: str  # e.g. "llama.cpp smollm2", "c=4"
    system: str  # "mlx-serve", "llama_cpp.server", "raw llama.cpp", ...
    metric: str  # e.g. "tok_s", "ttft_s"
    unit: str
    higher_is_better: bool
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data |= {
            "median": self.median,
            "min": min(self.samples) if self.samples else None,
            "max": max(self.samples) if self.samples else None,
        }
        return data


def physical_cores() -> int:
    """Physical cores (llama.cpp's right thread count, ARCHITECTURE.md "Verified facts"); the CPU count when unknown."""
    try:
        pairs = set()
        core = phys = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not key and core is not None:
                pairs.add((phys, core))
                core = phys = None
        if core is not None:
            pairs.add((phys, core))
        return len(pairs) or os.cpu_count() or 1
    except OSError:
        return os.cpu_count() or 1


def load_test_models() -> ModuleType:
    """tests/models.py, imported by path (tests/ is no package under --import-mode=importlib)."""
    name = "mlx_serve_test_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS_DIR / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_models() -> Models:
    """The model files every system shares; the MLX ones are built once and cached on disk."""
    tm = load_test_models()
    gguf_path = tm.smollm2_gguf_path()
    return Models(
        gguf_path,
        tm.build_smollm2_mlx(gguf_path),
        tm.build_tiny_mlx(gguf_path),
        build_smollm2_fim_gguf(gguf_path, tm.cached_build),
        tm.build_tiny_fim_gguf(gguf_path),
    )
