"""Load a profile from disk: TOML -> [defaults] merge -> env overrides -> strict validation.

Every problem is reported as `file:line: dotted.key: message`, one per line, so a user can jump
straight to it. A missing file is an error, never an empty profile (pydantic-settings' TOML source
would treat it as empty, see ARCHITECTURE.md "Verified facts").
"""

from __future__ import annotations

import copy
import hashlib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .env import env_overrides
from .locate import locate_key
from .schema import Defaults, Profile, ProfileRuleErrors, Server

_BARE_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")
DEFAULT_PROFILE_PATH = Path("~/.mlx-serve/config.toml").expanduser()
EMBEDDED_DEFAULT_NAME = "default.toml"


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ProfileError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class LoadedProfile:
    profile: Profile
    path: str
    sha256: str
    text: str


def embedded_default_text() -> str:
    return resources.files("mlx_serve.profiles").joinpath("examples", EMBEDDED_DEFAULT_NAME).read_text()


def load_profile(path: str | Path | None, *, apply_env: bool = True) -> LoadedProfile:
    """Load the profile at `path`; None means the user's default location, else the embedded default."""
    if path is None:
        if DEFAULT_PROFILE_PATH.exists():
            path = DEFAULT_PROFILE_PATH
        else:
            return parse_profile(embedded_default_text(), "<embedded default>", apply_env=apply_env)
    file = Path(path).expanduser()
    if not file.is_file():
        raise ProfileError([Problem(str(file), None, "", "profile file not found")])
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError([Problem(str(file), None, "", f"cannot read profile: {exc}")]) from None
    return parse_profile(text, str(file), apply_env=apply_env)


def server_of_invalid(path: str | Path | None, *, apply_env: bool = True) -> Server | None:
    """The [server] table of a profile that failed to load, when that table is valid on its own:
    the daemon still listens where its clients were told to look, and answers them 503 with the
    reason, instead of 'connection refused' on a port nobody configured. None when it is not."""
    file = Path(path).expanduser() if path is not None else DEFAULT_PROFILE_PATH
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    server = raw.get("server", {})
    if apply_env:
        server = (
            _deep_merge(server, env_overrides().get("server", {})) if isinstance(server, dict) else server
        )
    try:
        return Server.model_validate(server)
    except ValidationError:
        return None


def parse_profile(text: str, filename: str, *, apply_env: bool = True) -> LoadedProfile:
    sha = hashlib.sha256(text.encode()).hexdigest()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        raise ProfileError([Problem(filename, line, "", f"TOML syntax error: {exc}")]) from None
    data = _merge_defaults(raw)
    if apply_env:
        data = _deep_merge(data, env_overrides())
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_problems(exc, data, text, filename)) from None
    return LoadedProfile(profile=profile, path=filename, sha256=sha, text=text)


def _merge_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Copy `[defaults]` into each model table. Skipped when the defaults themselves are invalid,
    so their errors are reported once, under `defaults.*`."""
    defaults, models = raw.get("defaults"), raw.get("models")
    if not isinstance(defaults, dict) or not isinstance(models, dict):
        return raw
    try:
        Defaults.model_validate(defaults)
    except ValidationError:
        return raw
    merged = dict(raw)
    merged["models"] = {
        mid: _deep_merge(defaults, spec) if isinstance(spec, dict) else spec for mid, spec in models.items()
    }
    return merged


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _problems(exc: ValidationError, data: dict[str, Any], text: str, filename: str) -> list[Problem]:
    by_key: dict[str, list[dict[str, Any]]] = {}
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ProfileRuleErrors):
            problems += [Problem(filename, locate_key(text, k), k, m) for k, m in cause.problems]
            continue
        by_key.setdefault(_dotted(err, data), []).append(err)
    for key, errs in by_key.items():
        problems.append(Problem(filename, locate_key(text, key), key, _message(errs)))
    return sorted(problems, key=lambda p: (p.line or 0, p.key))


def _dotted(err: dict[str, Any], data: Any) -> str:
    """Pydantic's loc minus union-member and validator names: only the keys the user wrote."""
    parts: list[str] = []
    node = data
    for item in err["loc"]:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            parts[-1] += f"[{item}]"
            node = node[item]
        elif isinstance(item, str) and isinstance(node, dict) and item in node:
            parts.append(item if _BARE_KEY.match(item) else f'"{item}"')
            node = node[item]
        elif isinstance(item, str) and err["type"] == "missing" and isinstance(node, dict):
            parts.append(item)
            break
        elif item == "[key]":
            continue
        else:
            break
    return ".".join(parts)


def _message(errs: list[dict[str, Any]]) -> str:
    first = errs[0]
    if first["loc"][-1] == "[key]" and first["loc"][0] == "models":
        return "model ids may use letters, digits and . _ : - / (up to 128 characters)"
    if first["type"] == "extra_forbidden":
        return "unknown key (check the spelling; see `mlx-serve config init` for every key)"
    if first["type"] == "missing":
        return "required key is missing"
    if len(errs) > 1 and all(e["type"].endswith("_type") or e["type"] == "literal_error" for e in errs):
        wanted = " or ".join(dict.fromkeys(_clean(e["msg"]) for e in errs))
        return f"{wanted} (got {type(first['input']).__name__} {first['input']!r})"
    msg = _clean(first["msg"])
    if first["type"].endswith("_type") or first["type"] in ("literal_error", "enum"):
        msg += f" (got {first['input']!r})"
    return msg


def _clean(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg.replace("Input should be", "must be").replace("String should", "must")


def _line_from_message(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None
