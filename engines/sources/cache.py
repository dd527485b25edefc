"""mlx-serve's own model cache: converted (GGUF -> MLX) and quantized MLX folders under
$MLX_SERVE_HOME/cache/<kind>/<name>-<hash of source fingerprint + recipe>.

Each entry is built in a temporary folder next to it and renamed into place, with a marker file
(written last) that records the recipe and every file's size. An entry whose marker, config.json or a
weight file is missing, or whose file sizes changed (deleted or corrupted by hand), is rebuilt on the
next use. A file lock per entry keeps two loads (threads or processes) from building it twice.
Downloads are not here: they live in the standard Hugging Face cache (engines/sources/hub.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_serve.engines.sources.paths import cache_dir

log = logging.getLogger("mlx_serve.cache")
KINDS = ("gguf-mlx", "quantized")
MARKER = "mlx-serve-entry.json"
builds: Counter[str] = Counter()  # entries built by this process, per kind (tests and logs use it)


def entry_path(kind: str, name: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(kind, f"{name}-{digest}")


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER).read_text())
        return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def is_valid(path: Path) -> bool:
    """Complete as built: marker present, config.json and every recorded file there at its recorded size."""
    marker = read_marker(path)
    if marker is None or "config.json" not in marker["files"]:
        return False
    for name, size in marker["files"].items():
        file = path / name
        try:
            if not file.is_file() or file.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure(path: Path, build: Callable[[Path], None], about: dict[str, Any]) -> Path:
    """The entry at `path`, built with build(out) (out does not exist yet) when missing or damaged.
    `about` (source, recipe, ...) goes into the marker for `mlx-serve cache ls`."""
    with _locked(path):
        if is_valid(path):
            return path
        if path.exists():
            log.warning("cache entry %s is incomplete or damaged; rebuilding it", path)
            shutil.rmtree(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            started = time.monotonic()
            out = tmp / "model"
            build(out)
            files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
            marker = {**about, "created": time.time(), "files": files}
            (out / MARKER).write_text(json.dumps(marker, indent=2))
            os.rename(out, path)
            builds[path.parent.name] += 1
            log.info("built %s in %.1fs", path, time.monotonic() - started)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---- listing and pruning (`mlx-serve cache ls | prune`) --------------------------------------------
@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str
    size: int
    valid: bool
    source: str | None
    recipe: str | None
    created: float | None

    @property
    def name(self) -> str:
        return self.path.name


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():  # follows symlinks: a Hugging Face snapshot links to its blobs
                total += p.stat().st_size
        except OSError:
            pass
    return total


def list_entries() -> list[Entry]:
    """Every entry and every leftover temporary build folder (invalid, so prune removes it)."""
    entries: list[Entry] = []
    for kind in KINDS:
        folder = cache_dir(kind)
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_dir():
                continue
            marker = read_marker(path) or {}
            entries.append(
                Entry(
                    path, kind, dir_size(path), is_valid(path), marker.get("source"),
                    marker.get("recipe"), marker.get("created"),
                )
            )  # fmt: skip
    return entries


def prune(keep: set[Path], everything: bool = False, dry_run: bool = False) -> list[Entry]:
    """Remove entries not in `keep` (all of them with everything=True); returns what was (or would be) removed."""
    kept = {p.resolve() for p in keep}
    doomed = [e for e in list_entries() if everything or e.path.resolve() not in kept or not e.valid]
    if not dry_run:
        for entry in doomed:
            owner = _owner(entry.path)
            with _locked(owner):  # waits for a build in progress; a crashed build's leftovers go at once
                shutil.rmtree(entry.path, ignore_errors=True)
            if not owner.exists():
                (owner.parent / f".{owner.name}.lock").unlink(missing_ok=True)
    return doomed


def _owner(path: Path) -> Path:
    """The entry a folder belongs to: itself, or for a temporary build folder '.NAME.xxxx.tmp', NAME."""
    if path.name.startswith(".") and path.name.endswith(".tmp"):
        return path.with_name(path.name[1:-4].rsplit(".", 1)[0])
    return path
