"""`mlx-serve pull MODEL`, `mlx-serve models [--discover]`, `mlx-serve cache ls | prune`.

pull downloads what a profile model (and its draft model) needs and builds its MLX conversion or
quantization, so the first request does not wait for it. Downloads resume where they stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from mlx_serve.daemon.cli.admin import daemon_url
from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.kind import engine_kind
from mlx_serve.engines.sources.progress import (
    DownloadEvent,
    add_progress_listener,
    format_bytes,
    remove_progress_listener,
)
from mlx_serve.engines.sources.resolve import (
    cache,
    cached_source,
    is_hub_source,
    model_cache_entries,
    prepare,
)
from mlx_serve.profiles.loader import ProfileError, load_profile
from mlx_serve.profiles.schema import ModelSpec, Profile


def add_models_commands(commands: argparse._SubParsersAction) -> None:
    pull = commands.add_parser("pull", help="download (and convert / quantize) what a profile model needs")
    pull.add_argument("model", metavar="MODEL_ID", help="a model id (or alias) of the profile")
    pull.add_argument("--profile", help="profile path (default ~/.mlx-serve/config.toml)")
    pull.set_defaults(handler=_pull)

    models = commands.add_parser(
        "models", help="the profile's models: source, quantization, size on disk, state"
    )
    models.add_argument("--profile", help="profile path (default ~/.mlx-serve/config.toml)")
    models.add_argument("--url", help="daemon URL to ask which models are loaded (default: from the profile)")
    models.add_argument("--discover", action="store_true", help="also list LM Studio's downloaded models")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(handler=_models)

    cache_cmd = commands.add_parser("cache", help="converted and quantized models under ~/.mlx-serve/cache")
    sub = cache_cmd.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)
    ls = sub.add_parser("ls", help="list cache entries, their size and which profile models use them")
    ls.add_argument("--profile", help="profile whose models count as users")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=_cache_ls)
    prune = sub.add_parser("prune", help="remove entries the profile's models do not use")
    prune.add_argument("--profile", help="profile whose models' entries are kept")
    prune.add_argument("--all", action="store_true", help="remove every entry")
    prune.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    prune.set_defaults(handler=_cache_prune)


def _profile(args: argparse.Namespace) -> Profile | None:
    try:
        return load_profile(args.profile).profile
    except ProfileError as exc:
        print(f"cannot read the profile:\n{exc}", file=sys.stderr)
        return None


# ---- pull -------------------------------------------------------------------------------------
class _TerminalBar:
    """One redrawn line per model: bar, percent, bytes, rate, ETA."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self._last = stream, 0.0

    def __call__(self, event: DownloadEvent) -> None:
        now = time.monotonic()
        if event.kind == "progress" and now - self._last < 0.1:
            return
        self._last = now
        frac = min(1.0, event.done / event.total) if event.total else 0.0
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta = f"ETA {int(event.eta) // 60}:{int(event.eta) % 60:02d}" if event.eta is not None else ""
        line = (
            f"\r{event.model_id} [{bar}] {100 * frac:3.0f}% {format_bytes(event.done)}/{format_bytes(event.total)}"
            f" {format_bytes(event.rate)}/s {eta}"
        )
        self.stream.write(line.ljust(100))
        if event.kind in ("done", "failed"):
            self.stream.write("\n")
        self.stream.flush()


def _lookup(profile: Profile, name: str) -> str | None:
    if name in profile.models:
        return name
    return next((mid for mid, spec in profile.models.items() if name in spec.aliases), None)


def _pull(args: argparse.Namespace) -> int:
    profile = _profile(args)
    if profile is None:
        return 2
    model_id = _lookup(profile, args.model)
    if model_id is None:
        print(
            f"{args.model!r} is not a model of the profile; it has: {', '.join(profile.models)}",
            file=sys.stderr,
        )
        return 2
    spec = profile.models[model_id]
    ids = [model_id]
    if spec.speculative is not None and spec.speculative.draft_model:
        ids.append(spec.speculative.draft_model)
    tty = sys.stderr.isatty()
    bar = _TerminalBar(sys.stderr) if tty else None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("mlx_serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if bar is not None:
        logging.getLogger("mlx_serve.download").setLevel(logging.WARNING)  # the bar shows progress
        add_progress_listener(bar)
    try:
        for mid in ids:
            started = time.monotonic()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # mlx-lm's conversion prints its steps
                    path = prepare(mid, profile.models[mid], refresh=True)
            except ModelLoadError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"{mid}: ready in {time.monotonic() - started:.1f}s: {path}")
    finally:
        if bar is not None:
            remove_progress_listener(bar)
        logger.removeHandler(handler)
    return 0


# ---- models -----------------------------------------------------------------------------------
def _daemon_states(args: argparse.Namespace) -> dict[str, str] | None:
    try:
        with urllib.request.urlopen(daemon_url(args) + "/status", timeout=2) as resp:
            return {m["id"]: m["state"] for m in json.loads(resp.read())["models"]}
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None


def _quantization(spec: ModelSpec, path: Path | None) -> str:
    if spec.quantize not in (None, "none"):
        return f"{spec.quantize}/{spec.group_size or 64} on load"
    if path is not None and path.is_file():
        from mlx_serve.engines.sources.repo_files import quant_label

        return quant_label(path.name) or "gguf"
    if spec.gguf_quant:
        return spec.gguf_quant
    if path is None:
        return "-"
    try:
        config = json.loads((path / "config.json").read_text())
        quant = config.get("quantization") or {}
        return f"{quant['bits']}-bit" if quant.get("bits") else "full precision"
    except (OSError, ValueError, AttributeError):
        return "-"


def model_row(model_id: str, spec: ModelSpec, states: dict[str, str] | None) -> dict[str, Any]:
    path = cached_source(model_id, spec)
    entries = model_cache_entries(model_id, spec)
    built = [e for e in entries if cache.is_valid(e)]
    status = ["downloaded" if path else "not downloaded"] if is_hub_source(spec.source) else []
    if not is_hub_source(spec.source) and path is None:
        status.append("source missing")
    if entries:
        status.append("converted" if len(built) == len(entries) else "not converted")
    state = states.get(model_id) if states is not None else None
    if state:
        status.append(state)
    size = (cache.dir_size(path) if path is not None else 0) + sum(cache.dir_size(e) for e in built)
    source = spec.source + (f"@{spec.revision}" if spec.revision else "")
    return {
        "id": model_id, "source": source, "engine": engine_kind(spec), "quantization": _quantization(spec, path),
        "disk_bytes": size, "downloaded": path is not None, "converted": len(built) == len(entries) if entries else None,
        "state": state, "status": ", ".join(status) or "-", "path": str(path) if path else None,
    }  # fmt: skip


def _models(args: argparse.Namespace) -> int:
    profile = _profile(args)
    if profile is None:
        return 2
    states = _daemon_states(args)
    rows = [model_row(mid, spec, states) for mid, spec in profile.models.items()]
    found = []
    if args.discover:
        from mlx_serve.engines.sources.lmstudio import discover, roots

        found = discover()
    if args.json:
        lmstudio = [
            {"source": m.source, "format": m.format, "size": m.size, "quants": m.quants} for m in found
        ]
        print(
            json.dumps({"models": rows, "daemon_running": states is not None, "lmstudio": lmstudio}, indent=2)
        )
        return 0
    print(f"{'MODEL':20} {'ENGINE':9} {'QUANTIZATION':18} {'ON DISK':>9}  {'STATUS':34} SOURCE")
    for r in rows:
        size = format_bytes(r["disk_bytes"]) if r["disk_bytes"] else "-"
        print(
            f"{r['id']:20} {r['engine']:9} {r['quantization']:18} {size:>9}  {r['status']:34} {r['source']}"
        )
    if states is None:
        print(f"(the daemon is not reachable at {daemon_url(args)}: load states unknown)")
    if args.discover:
        print(f"\nLM Studio models ({', '.join(str(r) for r in roots())}):")
        for m in found:
            quants = ", ".join(m.quants) if m.quants else "-"
            print(f"  {m.source:50} {m.format:5} {format_bytes(m.size):>9}  {quants}")
        if not found:
            print("  none found")
    return 0


# ---- cache ------------------------------------------------------------------------------------
def _users(profile: Profile | None) -> dict[Path, list[str]]:
    users: dict[Path, list[str]] = {}
    for mid, spec in (profile.models if profile else {}).items():
        for entry in model_cache_entries(mid, spec):
            users.setdefault(entry.resolve(), []).append(mid)
    return users


def _cache_ls(args: argparse.Namespace) -> int:
    users = _users(_profile(args))
    entries = cache.list_entries()
    if args.json:
        out = [
            {"path": str(e.path), "kind": e.kind, "size": e.size, "valid": e.valid, "source": e.source,
             "recipe": e.recipe, "used_by": users.get(e.path.resolve(), [])}
            for e in entries
        ]  # fmt: skip
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'KIND':9} {'SIZE':>9}  {'STATE':10} {'USED BY':16} {'RECIPE':26} ENTRY")
    for e in entries:
        state = "ok" if e.valid else "incomplete"
        used = ",".join(users.get(e.path.resolve(), [])) or "-"
        print(f"{e.kind:9} {format_bytes(e.size):>9}  {state:10} {used:16} {e.recipe or '-':26} {e.path}")
    print(f"{len(entries)} entries, {format_bytes(sum(e.size for e in entries))} in {cache.cache_dir()}")
    return 0


def _cache_prune(args: argparse.Namespace) -> int:
    profile = _profile(args)
    if profile is None and not args.all:
        print(
            "refusing to prune without a profile to tell which entries are in use (or pass --all)",
            file=sys.stderr,
        )
        return 2
    removed = cache.prune(set(_users(profile)), everything=args.all, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e.path} ({format_bytes(e.size)})")
    print(f"{verb} {len(removed)} entries, {format_bytes(sum(e.size for e in removed))}")
    return 0
