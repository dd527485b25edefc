"""Download progress: log lines every few seconds, and listeners (metrics, the `pull` progress bar).

Events come from the thread that downloads (an engine's load thread or the CLI); listeners must be
quick and thread-safe. Bound methods are held weakly, so a listener's owner can simply go away.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mlx_serve.download")


@dataclass(frozen=True)
class DownloadEvent:
    model_id: str
    repo: str
    kind: str  # start | progress | done | failed
    done: int  # bytes on disk for this download so far (resumed bytes included)
    total: int
    delta: int = 0  # bytes received since the previous event
    rate: float = 0.0  # bytes/s received during this attempt
    error: str | None = None

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 and self.total >= self.done else None


_listeners: list[Callable[[], Callable[[DownloadEvent], None] | None]] = []
_listeners_lock = threading.Lock()


def add_progress_listener(fn: Callable[[DownloadEvent], None]) -> None:
    """Call fn(event) for every download event; bound methods are held weakly."""
    ref: Callable[[], Any] = weakref.WeakMethod(fn) if inspect.ismethod(fn) else (lambda: fn)  # type: ignore[arg-type]
    with _listeners_lock:
        _listeners.append(ref)


def remove_progress_listener(fn: Callable[[DownloadEvent], None]) -> None:
    with _listeners_lock:
        _listeners[:] = [ref for ref in _listeners if ref() not in (None, fn)]


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def describe(event: DownloadEvent) -> str:
    pct = f"{100 * event.done / event.total:.0f}% " if event.total else ""
    eta = f", ETA {event.eta:.0f}s" if event.eta is not None else ""
    return (
        f"{pct}{format_bytes(event.done)} of {format_bytes(event.total)}, {format_bytes(event.rate)}/s{eta}"
    )


class Progress:
    LOG_EVERY = 5.0

    def __init__(self, model_id: str, repo: str, total: int) -> None:
        self.model_id, self.repo, self.total, self.done = model_id, repo, total, 0
        self._received, self._started = 0, time.monotonic()
        self._logged, self._lock = self._started, threading.Lock()
        log.info("model %s: downloading %s from %s", model_id, format_bytes(total), repo)
        self._emit("start", 0)

    def _event(self, kind: str, delta: int, error: str | None = None) -> DownloadEvent:
        rate = self._received / max(time.monotonic() - self._started, 1e-6)
        return DownloadEvent(self.model_id, self.repo, kind, self.done, self.total, delta, rate, error)

    def _emit(self, kind: str, delta: int, error: str | None = None) -> None:
        event = self._event(kind, delta, error)
        with _listeners_lock:
            fns = [ref() for ref in _listeners]
        for fn in fns:
            if fn is not None:
                try:
                    fn(event)
                except Exception:
                    log.exception("download progress listener failed")

    def resumed(self, n: int) -> None:
        self.done += n  # bytes already on disk from an earlier attempt: counted, but not in the rate
        self._emit("progress", 0)

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            self._received += n
            now = time.monotonic()
            due = now - self._logged >= self.LOG_EVERY
            if due:
                self._logged = now
        if due:
            log.info("model %s: downloaded %s", self.model_id, describe(self._event("progress", 0)))
        self._emit("progress", n)

    def finish(self, error: str | None = None) -> None:
        if error is None:
            log.info("model %s: download complete (%s)", self.model_id, describe(self._event("done", 0)))
        self._emit("failed" if error else "done", 0, error)

    def bar_class(self) -> type:
        """A tqdm look-alike for huggingface_hub's http_get that feeds this progress."""
        progress = self

        class _Bar:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def __enter__(self) -> _Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def update(self, n: float | None = 1) -> None:
                progress.advance(int(n or 0))

            def close(self) -> None:
                pass

            def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

        return _Bar
