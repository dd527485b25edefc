"""The profile: shipped examples validate, every bad case gives one clear line with its dotted key,
env overrides, diff plans, the checked-in JSON schema, and the `config` CLI end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_serve.profiles.diff import diff
from mlx_serve.profiles.jsonschema import SCHEMA_PATH, render_schema
from mlx_serve.profiles.loader import ProfileError, load_profile, parse_profile
from mlx_serve.profiles.starter import starter_text
from mlx_serve.profiles.units import parse_duration, parse_size

EXAMPLES = sorted((Path(__file__).parents[1] / "profiles" / "examples").glob("*.toml"))
GOOD_MODEL = '[models.chat]\nsource = "/models/chat.gguf"\n'


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlx_serve.daemon", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_profiles_validate(path: Path) -> None:
    result = cli("config", "validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_examples_include_default_editor_minimal() -> None:
    assert {p.stem for p in EXAMPLES} >= {"default", "editor", "minimal"}


BAD_PROFILES = [
    ("toml syntax", "[server\nport = 1\n", 1, "", "TOML syntax error"),
    ("unknown key", GOOD_MODEL + "[server]\nprot = 8080\n", 4, "server.prot", "unknown key"),
    ("wrong type", GOOD_MODEL + '[server]\nport = "8080"\n', 4, "server.port", "valid integer"),
    (
        "out of range",
        GOOD_MODEL + "[server]\nport = 70000\n",
        4,
        "server.port",
        "less than or equal to 65535",
    ),
    ("kv bits", GOOD_MODEL + "kv_cache = { bits = 3 }\n", 3, "models.chat.kv_cache.bits", "must be 4 or 8"),
    ("bad ttl", GOOD_MODEL + 'ttl = "soon"\n', 3, "models.chat.ttl", "not a duration"),
    (
        "duplicate model id",
        GOOD_MODEL + '[models.chat]\nsource = "/other.gguf"\n',
        3,
        "",
        "Cannot declare ('models', 'chat') twice",
    ),
    (
        "duplicate alias",
        GOOD_MODEL + 'aliases = ["fast"]\n[models.code]\nsource = "/c.gguf"\naliases = ["fast"]\n',
        6,
        "models.code.aliases[0]",
        "already the alias of models.chat",
    ),
    (
        "alias collides with a model id",
        GOOD_MODEL + 'aliases = ["code"]\n[models.code]\nsource = "/c.gguf"\n',
        3,
        "models.chat.aliases[0]",
        "already the model id",
    ),
    (
        "glob alias matches another id",
        GOOD_MODEL + 'aliases = ["co*"]\n[models.code]\nsource = "/c.gguf"\n',
        3,
        "models.chat.aliases[0]",
        "matches the model id 'code'",
    ),
    (
        "quantize on a GGUF engine",
        GOOD_MODEL + 'engine = "llama_cpp"\nquantize = "q4"\n',
        4,
        "models.chat.quantize",
        "already quantized",
    ),
    (
        "llama_cpp on an MLX folder",
        '[models.chat]\nsource = "/models/chat"\nengine = "llama_cpp"\n',
        3,
        "models.chat.engine",
        "needs a GGUF source",
    ),
    (
        "draft model missing",
        GOOD_MODEL + 'speculative = { draft_model = "tiny" }\n',
        3,
        "models.chat.speculative.draft_model",
        "'tiny' is not a model in this profile",
    ),
    (
        "both speculative kinds",
        GOOD_MODEL + 'speculative = { draft_model = "x", prompt_lookup = {} }\n',
        3,
        "models.chat.speculative",
        "exactly one of draft_model or prompt_lookup",
    ),
    ("missing source", '[models.chat]\nengine = "mlx"\n', 1, "models.chat.source", "required key is missing"),
    ("bad model id", '[models."a b"]\nsource = "/x.gguf"\n', 1, 'models."a b"', "model ids may use"),
    (
        "negative number",
        GOOD_MODEL + "[server.limits]\nmax_tokens = -5\n",
        4,
        "server.limits.max_tokens",
        "greater than",
    ),
    (
        "cors wildcard",
        GOOD_MODEL + '[server]\ncors_origins = ["*"]\n',
        4,
        "server.cors_origins",
        "no wildcards",
    ),
    (
        "open network without keys",
        GOOD_MODEL + '[server]\nhost = "0.0.0.0"\n[auth]\nrequire_keys = "never"\n',
        6,
        "auth.require_keys",
        "allow_unauthenticated_network",
    ),
    (
        "bad defaults",
        GOOD_MODEL + '[defaults]\nengine = "vllm"\n',
        4,
        "defaults.engine",
        "must be 'auto', 'mlx' or 'llama_cpp'",
    ),
]


@pytest.mark.parametrize("name,text,line,key,message", BAD_PROFILES, ids=[b[0] for b in BAD_PROFILES])
def test_bad_profile_one_clear_line(
    tmp_path: Path, name: str, text: str, line: int | None, key: str, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = cli("config", "validate", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    where = f"{path}:{line}:" if line else f"{path}:"
    assert lines[0].startswith(where), lines[0]
    if key:
        assert f" {key}: " in lines[0], lines[0]
    assert message in lines[0], lines[0]


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(GOOD_MODEL + 'ttl = "soon"\nkv_cache = { bits = 3 }\n[server]\nport = -1\n')
    result = cli("config", "validate", str(path))
    assert result.returncode == 1
    keys = [line.split(": ")[1] for line in result.stderr.strip().splitlines()]
    assert keys == ["models.chat.ttl", "models.chat.kv_cache.bits", "server.port"]


def test_missing_file_is_an_error_not_an_empty_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(tmp_path / "nope.toml")
    result = cli("config", "validate", str(tmp_path / "nope.toml"))
    assert result.returncode == 1 and "not found" in result.stderr


def test_defaults_are_inherited_and_overridable() -> None:
    text = textwrap.dedent(
        """
        [defaults]
        ttl = "1h"
        sampling = { temperature = 0.3, top_p = 0.9 }
        [models.a]
        source = "/a.gguf"
        [models.b]
        source = "/b.gguf"
        ttl = 0
        sampling = { temperature = 1.0 }
        """
    )
    profile = parse_profile(text, "t.toml", apply_env=False).profile
    assert profile.models["a"].ttl_seconds == 3600
    assert profile.models["a"].sampling.temperature == 0.3
    assert profile.models["b"].ttl_seconds == 0
    assert profile.models["b"].sampling.temperature == 1.0
    assert profile.models["b"].sampling.top_p == 0.9  # nested tables merge key by key


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_SERVE_SERVER__PORT", "9123")
    monkeypatch.setenv("MLX_SERVE_SERVER__HOST", "::1")
    monkeypatch.setenv("MLX_SERVE_METRICS__ENABLED", "false")
    profile = parse_profile(GOOD_MODEL, "t.toml").profile
    assert (profile.server.port, profile.server.host, profile.metrics.enabled) == (9123, "::1", False)
    monkeypatch.setenv("MLX_SERVE_SERVER__PORT", "lots")
    with pytest.raises(ProfileError, match="server.port"):
        parse_profile(GOOD_MODEL, "t.toml")


def _profile(text: str):
    return parse_profile(text, "t.toml", apply_env=False).profile


def test_diff_plan() -> None:
    old = _profile(
        GOOD_MODEL
        + '[models.code]\nsource = "/c.gguf"\n[models.gone]\nsource = "/g.gguf"\n'
        + '[models.drafted]\nsource = "/m"\nengine = "mlx"\nspeculative = { draft_model = "draft" }\n'
        + '[models.draft]\nsource = "/d"\nengine = "mlx"\n'
    )
    new = _profile(
        GOOD_MODEL
        + 'aliases = ["gpt-4o"]\nttl = "1h"\n'
        + '[models.code]\nsource = "/c2.gguf"\n[models.new]\nsource = "/n.gguf"\n'
        + '[models.drafted]\nsource = "/m"\nengine = "mlx"\nspeculative = { draft_model = "draft" }\n'
        + '[models.draft]\nsource = "/d"\nengine = "mlx"\nkv_cache = { bits = 8 }\n'
        + "[server]\nport = 9000\n"
    )
    plan = diff(old, new)
    assert plan.added == ("new",)
    assert plan.removed == ("gone",)
    assert set(plan.reloaded) == {"code", "draft", "drafted"}
    assert plan.metadata_only == ("chat",)
    assert plan.sections == ("server",)
    assert diff(old, old).is_empty


def test_json_schema_is_checked_in_and_current() -> None:
    assert SCHEMA_PATH.read_text() == render_schema(), (
        "profiles/profile.schema.json drifted: run `make schema` and commit it"
    )


def test_config_init_writes_a_valid_commented_profile_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.toml"
    first = cli("config", "init", str(path))
    assert first.returncode == 0, first.stderr
    text = path.read_text()
    assert "# " in text and text == starter_text()
    assert cli("config", "validate", str(path)).returncode == 0
    path.write_text(text + "# my edit\n")
    again = cli("config", "init", str(path))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert path.read_text().endswith("# my edit\n")


def test_config_show_fills_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD_MODEL)
    result = cli("config", "show", str(path))
    assert result.returncode == 0
    shown = parse_profile(result.stdout, "shown.toml", apply_env=False).profile
    assert shown == parse_profile(GOOD_MODEL, "c.toml", apply_env=False).profile
    assert "port = 11435" in result.stdout and 'ttl = "5m"' in result.stdout


def test_config_diff_cli(tmp_path: Path) -> None:
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text(GOOD_MODEL)
    new.write_text(GOOD_MODEL + 'aliases = ["x"]\n')
    result = cli("config", "diff", str(old), str(new))
    assert result.returncode == 0
    assert "chat: metadata (aliases)" in result.stdout


def test_help_on_every_level() -> None:
    for args in ([], ["config"], ["config", "validate"], ["serve"]):
        result = cli(*args, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, args
    assert cli("--version").stdout.startswith("mlx-serve ")


@pytest.mark.parametrize(
    "value,seconds",
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("250ms", 0.25),
        (0, 0),
        ("0", 0),
        (-1, None),
        ("forever", None),
        ("-5m", None),
        (90, 90),
    ],
)
def test_parse_duration(value, seconds) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 m", "", "m5", True])
def test_parse_duration_rejects(value) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_size() -> None:
    total = 16 * 2**30
    assert parse_size("75%", total) == 12 * 2**30
    assert parse_size("8GiB", total) == 8 * 2**30
    assert parse_size("8GB", total) == 8 * 10**9
    assert parse_size(0.5, total) == 8 * 2**30
    for bad in ("lots", "150%", 0.0, -3):
        with pytest.raises(ValueError):
            parse_size(bad, total)


def test_readme_profile_example_validates() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    profile = parse_profile(block, "README.md", apply_env=False).profile
    assert set(profile.models) == {"chat", "draft", "autocomplete", "embed"}
