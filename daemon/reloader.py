"""Live profile reload: watchdog on the profile's directory, SIGHUP, and `mlx-serve reload`.

Editors save in many ways (write in place, truncate then write, temp file + rename, vim's `4913`
probe, delete then recreate), so the directory is watched, events are filtered by file name and
debounced, and an empty or missing file is a save in progress, not an empty profile. A profile
that is a symlink (dotfiles repos) is followed: every folder along the link chain is watched, and
the chain is resolved again after each event, so editing the target or re-pointing the link both
reload.
Reload = read bytes -> same hash? skip -> parse + validate -> on error keep the old profile and
report -> diff -> apply per model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from mlx_serve.daemon.registry import Registry
from mlx_serve.daemon.state import DaemonState
from mlx_serve.profiles.loader import DEFAULT_PROFILE_PATH, ProfileError, parse_profile

log = logging.getLogger("mlx_serve.reloader")
DEBOUNCE_SECONDS = 0.25


MAX_LINK_HOPS = 40  # the kernel's own limit on a symlink chain


def link_chain(path: Path) -> list[Path]:
    """`path`, then each file its symlinks point to, in order (the last one holds the bytes)."""
    chain = [path]
    while chain[-1].is_symlink() and len(chain) <= MAX_LINK_HOPS:
        target = Path(os.readlink(chain[-1]))
        chain.append(target if target.is_absolute() else chain[-1].parent / target)
        if chain[-1] in chain[:-1]:  # a loop: nothing more to follow
            break
    return chain


def watched_names(path: Path) -> dict[str, frozenset[str]]:
    """The folders to watch for this profile, each with the file names in it that matter."""
    folders: dict[str, set[str]] = {}
    for hop in link_chain(path):
        if hop.parent.is_dir():
            folders.setdefault(str(hop.parent), set()).add(hop.name)
    return {folder: frozenset(names) for folder, names in folders.items()}


class _DirectoryHandler(FileSystemEventHandler):
    def __init__(self, names: frozenset[str], notify) -> None:
        self._names = names
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):  # our own reads: not a change
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        if any(Path(str(p)).name in self._names for p in paths if p):
            self._notify()


class Reloader:
    def __init__(self, state: DaemonState, registry: Registry) -> None:
        self._state = state
        self._registry = registry
        self._observer: Observer | None = None
        self._watching: dict[str, frozenset[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self.listeners: list = []  # called with (result: "success" | "failure" | "unchanged")

    @property
    def path(self) -> Path | None:
        if self._state.profile_path:
            return Path(self._state.profile_path).expanduser()
        return DEFAULT_PROFILE_PATH

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        path = self.path
        if path is None or not path.parent.is_dir():
            log.info("not watching for profile changes: %s does not exist", path.parent if path else "-")
            return
        self._observer = Observer()
        self._observer.daemon = True
        self._follow_links()
        self._observer.start()
        log.info("watching %s for changes", path)

    def _follow_links(self) -> None:
        """(Re)schedule the watches when the symlink chain to the profile has changed."""
        wanted = watched_names(self.path) if self.path is not None else {}
        if self._observer is None or wanted == self._watching:
            return
        self._observer.unschedule_all()
        for folder, names in wanted.items():
            self._observer.schedule(_DirectoryHandler(names, self.request_reload_threadsafe), folder)
        if self._watching:
            log.info("the profile's symlinks changed: now watching %s", ", ".join(sorted(wanted)))
        self._watching = wanted

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
        if self._timer is not None:
            self._timer.cancel()

    def request_reload_threadsafe(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.request_reload)

    def request_reload(self) -> None:
        """Debounced: a burst of file events (truncate, write, rename) becomes one reload."""
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop or asyncio.get_running_loop()
        self._timer = loop.call_later(DEBOUNCE_SECONDS, lambda: loop.create_task(self.reload()))

    async def reload(self) -> str:
        async with self._lock:
            self._follow_links()
            result = self._reload_once()
        self._state.reloads[result] = self._state.reloads.get(result, 0) + 1
        for listener in self.listeners:
            listener(result)
        return result

    def _reload_once(self) -> str:
        path = self.path
        if path is None or not path.is_file():
            log.info("profile %s is missing; keeping the current one (save in progress?)", path)
            return "unchanged"
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc)
            return "unchanged"
        if not data.strip():
            log.info("profile %s is empty; waiting for the save to finish", path)
            return "unchanged"
        current = self._state.loaded
        if current is not None and hashlib.sha256(data).hexdigest() == current.sha256:
            if not self._state.last_reload.successful:  # an invalid edit was reverted
                self._state.set_profile(current, summary="reverted to the profile in force")
            return "unchanged"
        try:
            loaded = parse_profile(data.decode("utf-8", errors="replace"), str(path))
        except ProfileError as exc:
            for problem in exc.problems:
                log.error("profile reload failed, keeping the previous profile: %s", problem)
            self._state.set_profile_errors(exc.problems)
            return "failure"
        started = time.monotonic()
        plan = self._registry.apply_profile(loaded.profile)
        self._state.set_profile(loaded, summary=plan.summary())
        log.info("profile reloaded in %.0f ms: %s", (time.monotonic() - started) * 1000, plan.summary())
        if "server" in plan.sections:
            log.info("server settings changed: the listener follows host/port; limits apply after a restart")
        return "success"
