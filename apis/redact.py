"""The user's home directory never leaves the daemon: logs and error bodies show it as `~`.

Paths under the home directory name the user (`/Users/jane/...`), so every formatted log line
(message, arguments and tracebacks) and every error message a client can see go through
redact_home(). Only whole path components match: with home `/home/al`, `/home/alice` stays.
"""

from __future__ import annotations

import logging
import os
import re
from functools import lru_cache


@lru_cache(maxsize=8)
def _pattern(home: str) -> re.Pattern[str] | None:
    homes = {home.rstrip("/")}
    try:
        homes.add(os.path.realpath(home).rstrip("/"))  # /var/... vs /private/var/... on macOS
    except OSError:
        pass
    homes = {h for h in homes if h.count("/") >= 1 and len(h) > 1}  # never redact "/" or ""
    if not homes:
        return None
    alternatives = "|".join(re.escape(h) for h in sorted(homes, key=len, reverse=True))
    return re.compile(rf"(?<![\w.~/-])(?:{alternatives})(?=[/\\\s'\"`,;:)\]}}>]|$)")


def _home() -> str:
    return os.environ.get("HOME") or os.path.expanduser("~")


def redact_home(text: str) -> str:
    """text with every absolute path under the home directory written as `~/...`."""
    if not text:
        return text
    pattern = _pattern(_home())
    return pattern.sub("~", text) if pattern is not None else text


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter: its output (message, arguments, traceback) with the home
    directory as `~`."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact_home(self.inner.format(record))


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Wrap the formatter of every handler of logger (default: the root logger). Handlers added
    later that copy a formatter from these (launchd/logrotate.py does) redact too."""
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
