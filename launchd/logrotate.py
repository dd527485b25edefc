"""Size-based log rotation, so an always-on daemon never fills the disk.

Files in the log directory (`$MLX_SERVE_HOME/logs`, default `~/.mlx-serve/logs`):

- `mlx-serve.log`: everything the daemon logs, through a RotatingFileHandler (10 MiB x 5).
- `daemon.out.log` / `daemon.err.log`: the process's stdout / stderr, opened by launchd
  (StandardOutPath / StandardErrorPath) or systemd (`append:`). They catch what logging cannot:
  tracebacks before logging is set up, native crashes, prints. The supervisor holds them open, so
  they are rotated by copy-then-truncate (safe: both supervisors open them with O_APPEND), at
  daemon start and then at most once a minute while the daemon logs.

When stderr *is* `daemon.err.log` (the daemon runs under the service), the stderr logging handler is
raised to WARNING: info lines go only to the rotating `mlx-serve.log`, not twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path

from mlx_serve.engines.sources.paths import home

LOG_NAME = "mlx-serve.log"
STDOUT_NAME = "daemon.out.log"
STDERR_NAME = "daemon.err.log"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5
STD_CHECK_INTERVAL = 60.0
DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def default_log_dir() -> Path:
    return home() / "logs"


def shift_backups(path: Path, backups: int) -> None:
    """path.(N-1) -> path.N, ..., path.1 -> path.2 (the oldest falls off)."""
    for index in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))


def _open_fd_for(path: Path) -> int | None:
    """stdout's or stderr's descriptor if it is this very file (same device and inode)."""
    try:
        target = path.stat()
    except OSError:
        return None
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return fd
    return None


def copytruncate(path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> bool:
    """Rotate a file another process keeps open: copy it to path.1, then truncate it in place."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except OSError:
        return False
    if backups > 0:
        shift_backups(path, backups)
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    fd = _open_fd_for(path)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # harmless with O_APPEND, needed without it
    else:
        with open(path, "r+b") as fh:
            fh.truncate(0)
    return True


def rotate_std_files(log_dir: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> list[Path]:
    """Rotate the supervisor's stdout / stderr files that exceed max_bytes; returns those rotated."""
    paths = [log_dir / STDOUT_NAME, log_dir / STDERR_NAME]
    return [p for p in paths if copytruncate(p, max_bytes, backups)]


class DaemonLogHandler(RotatingFileHandler):
    """RotatingFileHandler for mlx-serve.log that also keeps the supervisor's files in check."""

    def __init__(self, log_dir: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        super().__init__(log_dir / LOG_NAME, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.log_dir = log_dir
        self._next_std_check = time.monotonic() + STD_CHECK_INTERVAL

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        now = time.monotonic()
        if now >= self._next_std_check:
            self._next_std_check = now + STD_CHECK_INTERVAL
            try:
                rotate_std_files(self.log_dir, self.maxBytes, self.backupCount)
            except OSError:
                pass  # never let log housekeeping break the daemon


def stderr_is_service_log(log_dir: Path) -> bool:
    return _open_fd_for(log_dir / STDERR_NAME) == 2


def setup_file_logging(
    log_dir: Path | str | None = None, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS
) -> DaemonLogHandler | None:
    """Add the rotating mlx-serve.log handler to the root logger (idempotent) and rotate the
    supervisor's stdout/stderr files if they are too big. Call after logging.basicConfig().
    An unwritable log directory is reported and the daemon keeps logging to stderr only."""
    directory = Path(log_dir) if log_dir is not None else default_log_dir()
    log = logging.getLogger("mlx_serve.logs")
    root = logging.getLogger()
    for existing in root.handlers:
        if isinstance(existing, DaemonLogHandler) and existing.log_dir == directory:
            return existing
    try:
        directory.mkdir(parents=True, exist_ok=True)
        rotated = rotate_std_files(directory, max_bytes, backups)
        handler = DaemonLogHandler(directory, max_bytes, backups)
    except OSError as exc:
        log.warning("cannot log to %s (%s); logging to stderr only", directory, exc)
        return None
    formatter = next((h.formatter for h in root.handlers if h.formatter), None)
    handler.setFormatter(formatter or logging.Formatter(DEFAULT_FORMAT))
    root.addHandler(handler)
    if stderr_is_service_log(directory):
        for other in root.handlers:
            if isinstance(other, logging.StreamHandler) and getattr(other, "stream", None) is sys.stderr:
                other.setLevel(max(other.level, logging.WARNING))
    for path in rotated:
        log.info("rotated %s (over %d bytes)", path, max_bytes)
    log.info("logging to %s", directory / LOG_NAME)
    return handler
