"""Hugging Face sources: a repo id resolved to files in the standard HF cache, downloading what is missing.

What is fetched: for an MLX / safetensors repo the top-level files mlx-lm reads (its own allow-list:
config and tokenizer files, `model*.safetensors`); for a GGUF repo one quant (`gguf_quant`, default
Q4_K_M when there are several; every part of a split file). `source = "org/repo/FILE.gguf"` names a file.

Cache: the standard layout under HF_HUB_CACHE (HF_HOME/hub): blobs/<etag>, snapshots/<commit>/<file>
-> blob, refs/<revision>. A model whose files are all cached loads without touching the network (a
branch is not re-checked at load time; `mlx-serve pull` refreshes it). With HF_HUB_OFFLINE=1 the
network is never used. The repo listing is kept next to the snapshot (.mlx-serve/<commit>.json) so
quant selection gives the same answer offline.

Resume: huggingface_hub >= 1.0 deletes a partial file when an attempt fails (its temporary names are
unique per attempt; it retries with Range only inside one attempt). So each file is streamed here with
huggingface_hub's own `http_get` into a stable blobs/<etag>.incomplete, verified (size; sha256 for LFS
files) and only then renamed into place and linked into the snapshot: the next attempt continues
with a Range request, and nothing half-written is ever used. Files come over plain HTTPS (the same path
huggingface_hub takes without hf_xet).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.sources.progress import Progress, format_bytes
from mlx_serve.engines.sources.repo_files import parse_hub_source, plan_files
from mlx_serve.profiles.schema import ModelSpec

log = logging.getLogger("mlx_serve.download")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NETWORK_MODULES = {"httpx", "httpx2", "httpcore", "httpcore2", "h11", "requests", "urllib3"}


# ---- settings, read when used (a long-lived process and tests may change the environment) ---------
def hub_cache() -> Path:
    from huggingface_hub import constants

    if value := os.environ.get("HF_HUB_CACHE"):
        return Path(value).expanduser()
    if value := os.environ.get("HF_HOME"):
        return Path(value).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return (
        value.strip().upper() in {"1", "ON", "YES", "TRUE"} if value is not None else constants.HF_HUB_OFFLINE
    )


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _storage(repo: str) -> Path:
    return hub_cache() / f"models--{repo.replace('/', '--')}"


# ---- the cache ------------------------------------------------------------------------------------
def _listing_path(repo: str, commit: str) -> Path:
    return _storage(repo) / ".mlx-serve" / f"{commit}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _from_cache(
    model_id: str, spec: ModelSpec, repo: str, filename: str | None, revision: str, local_names: bool
) -> Path | None:
    """The cached model if every file it needs is complete; None when something is missing."""
    storage = _storage(repo)
    ref = storage / "refs" / revision
    commit = revision if _COMMIT.fullmatch(revision) else (ref.read_text().strip() if ref.is_file() else "")
    snapshot = storage / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        return None
    try:
        listing: dict[str, int | None] | None = json.loads(_listing_path(repo, commit).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listing = None
    guessed = listing is None
    if listing is None:  # a cache made by other tools: judge by the files that are there
        if not local_names:
            return None
        listing = {p.relative_to(snapshot).as_posix(): None for p in snapshot.rglob("*") if p.is_file()}
    where = (
        f"the cached copy of {repo!r} (offline: only cached files count)"
        if guessed
        else f"Hugging Face repo {repo!r}"
    )
    try:
        files, entry = plan_files(model_id, spec, filename, listing, where)
    except ModelLoadError:
        if not is_offline():
            return None  # the hub may know better (a newer commit may have the asked quant)
        raise
    if not all(_complete(snapshot / name, listing.get(name)) for name in files):
        return None
    return snapshot / entry if entry else snapshot


def _complete(path: Path, size: int | None) -> bool:
    try:
        return path.is_file() and (size is None or path.stat().st_size == size)
    except OSError:
        return False


def cached_repo(model_id: str, spec: ModelSpec) -> Path | None:
    """The model's files if they are all in the HF cache; never touches the network."""
    try:
        repo, filename = parse_hub_source(model_id, spec.source)
        return _from_cache(model_id, spec, repo, filename, spec.revision or "main", local_names=True)
    except ModelLoadError:
        return None


def fetch_repo(model_id: str, spec: ModelSpec, refresh: bool = False) -> Path:
    """The local snapshot folder (MLX repo) or .gguf file (first part) for a hub source, downloading
    what is missing. refresh=True asks the hub for the revision's current commit even when cached."""
    repo, filename = parse_hub_source(model_id, spec.source)
    revision = spec.revision or "main"
    if not refresh or is_offline():
        found = _from_cache(model_id, spec, repo, filename, revision, local_names=is_offline())
        if found is not None:
            return found
    if is_offline():
        raise ModelLoadError(
            model_id,
            f"{repo}@{revision} is not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE is set; "
            f"run `mlx-serve pull {model_id}` with network access",
        )
    try:
        commit, listing = _remote_listing(repo, revision)
    except Exception as exc:
        found = (
            _from_cache(model_id, spec, repo, filename, revision, local_names=True)
            if _is_network(exc)
            else None
        )
        if found is not None:
            log.warning(
                "model %s: the hub is unreachable (%s); using the cached copy", model_id, _first_line(exc)
            )
            return found
        raise ModelLoadError(model_id, _explain(repo, revision, exc)) from exc
    files, entry = plan_files(model_id, spec, filename, listing, f"Hugging Face repo {repo!r}")
    storage = _storage(repo)
    try:
        _write_atomic(_listing_path(repo, commit), json.dumps({"repo": repo, "files": listing}))
        _download(model_id, repo, commit, files, listing)
        if revision != commit:
            _write_atomic(storage / "refs" / revision, commit)
    except Exception as exc:
        raise ModelLoadError(model_id, _explain(repo, revision, exc)) from exc
    snapshot = storage / "snapshots" / commit
    return snapshot / entry if entry else snapshot


def _remote_listing(repo: str, revision: str) -> tuple[str, dict[str, int | None]]:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=_endpoint()).model_info(repo, revision=revision, files_metadata=True)
    if not info.sha:
        raise RuntimeError(f"the hub did not say which commit {revision!r} of {repo!r} is")
    return info.sha, {s.rfilename: s.size for s in info.siblings or []}


def _download(
    model_id: str, repo: str, commit: str, files: list[str], listing: dict[str, int | None]
) -> None:
    snapshot = _storage(repo) / "snapshots" / commit
    missing = [name for name in files if not _complete(snapshot / name, listing.get(name))]
    if not missing:
        return
    blobs = _storage(repo) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    total = sum(listing.get(name) or 0 for name in missing)
    partial = sum(p.stat().st_size for p in blobs.glob("*.incomplete") if p.is_file())
    free = shutil.disk_usage(blobs).free
    if total - partial > free:
        raise OSError(errno.ENOSPC, f"needs {format_bytes(total - partial)}, only {format_bytes(free)} free")
    progress = Progress(model_id, repo, total)
    try:
        for name in missing:
            _fetch_file(repo, commit, name, progress)
    except BaseException as exc:
        progress.finish(error=_first_line(exc))
        raise
    progress.finish()


def _fetch_file(repo: str, commit: str, filename: str, progress: Progress) -> None:
    from filelock import FileLock
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    storage = _storage(repo)
    meta = get_hf_file_metadata(
        hf_hub_url(repo, filename, revision=commit, endpoint=_endpoint()), endpoint=_endpoint()
    )
    if not meta.etag:
        raise RuntimeError(f"the hub sent no ETag for {filename}")
    blob = storage / "blobs" / meta.etag
    partial = blob.with_name(f"{meta.etag}.incomplete")
    lock = hub_cache() / ".locks" / storage.name / f"{meta.etag}.lock"  # the lock huggingface_hub takes
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if blob.is_file() and meta.size is not None and blob.stat().st_size != meta.size:
            log.warning("%s of %s in the cache has the wrong size; downloading it again", filename, repo)
            blob.unlink()
        if not blob.is_file():
            have = partial.stat().st_size if partial.is_file() else 0
            if meta.size is not None and have > meta.size:
                partial.unlink()
                have = 0
            if have:
                log.info("resuming %s of %s at %s", filename, repo, format_bytes(have))
                progress.resumed(have)
            with open(partial, "ab") as out:
                http_get(
                    meta.location, out, resume_size=have, headers=build_hf_headers(), expected_size=meta.size,
                    displayed_filename=filename, tqdm_class=progress.bar_class(),
                )  # fmt: skip
            _verify(partial, meta.size, meta.etag, filename)
            os.replace(partial, blob)
        pointer = storage / "snapshots" / commit / filename
        pointer.parent.mkdir(parents=True, exist_ok=True)
        link = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
        link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, pointer.parent), link)
        os.replace(link, pointer)


def _verify(partial: Path, size: int | None, etag: str, filename: str) -> None:
    actual = partial.stat().st_size
    if size is not None and actual != size:
        raise ConnectionError(f"{filename}: got {actual} of {size} bytes")
    if _SHA256.fullmatch(etag):  # LFS files: the ETag is the content's sha256
        digest = hashlib.sha256()
        with open(partial, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != etag:
            partial.unlink()
            raise RuntimeError(f"{filename}: downloaded bytes do not match the hub's sha256 (deleted; retry)")


# ---- errors ---------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_network(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", 0) or 0
        return status >= 500 or status in (408, 429)
    return (
        isinstance(exc, ConnectionError | TimeoutError)
        or type(exc).__module__.split(".")[0] in _NETWORK_MODULES
        or "Consistency check failed" in str(exc)
    )


def _explain(repo: str, revision: str, exc: BaseException) -> str:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return f"Hugging Face repo {repo!r} is gated: accept its terms on huggingface.co, then `hf auth login` or set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return f"Hugging Face repo {repo!r} does not exist (or is private: `hf auth login` or set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} does not exist in Hugging Face repo {repo!r}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (
            f"no space left on the disk of {hub_cache()} for {repo!r} ({_first_line(exc)}); "
            "free some space: what was downloaded is kept and the next attempt resumes"
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return f"{repo!r} is not fully cached and HF_HUB_OFFLINE is set"
    if isinstance(exc, EntryNotFoundError):
        return f"a file of {repo!r} listed by the hub cannot be downloaded: {_first_line(exc)}"
    if _is_network(exc):
        return (
            f"network error while downloading {repo!r} ({_first_line(exc)}); "
            "what was downloaded is kept and the next attempt resumes"
        )
    if isinstance(exc, HfHubHTTPError):
        return f"the hub refused {repo!r}: {_first_line(exc)}"
    return f"downloading {repo!r} failed: {type(exc).__name__}: {_first_line(exc)}"
