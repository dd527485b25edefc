"""Durations and sizes as users write them in profiles and requests."""

from __future__ import annotations

import math
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Longer than this is forever: a finite bound keeps timers and timestamps (datetime tops out in
# year 9999) in range, whatever a client sends as keep_alive.
MAX_DURATION_SECONDS = 100 * 365 * 86400.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_duration(value: int | float | str) -> float | None:
    """Ollama keep-alive semantics: seconds or '5m' / '1h30m'; 0 = unload after use;
    negative, 'forever' or longer than MAX_DURATION_SECONDS = never unload (None)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '5m', a number of seconds, or 'forever'")
    if isinstance(value, int | float):
        if isinstance(value, float) and math.isnan(value):
            raise ValueError("duration must be a number, not NaN")
        if value < 0 or value > MAX_DURATION_SECONDS:  # compares exactly, however big an int
            return None
        return float(value)
    text = value.strip().lower()
    if text in ("forever", "never", "-1", "inf"):
        return None
    if text.startswith("-") and _is_duration(text[1:]):
        return None
    if _is_duration(text):
        return parse_duration(sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text)))
    try:
        number = float(text)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a duration (use e.g. '30s', '5m', '1h', 0, or 'forever')"
        ) from None
    return parse_duration(number)


def _is_duration(text: str) -> bool:
    return bool(text) and _DURATION_PART.sub("", text) == "" and bool(_DURATION_PART.match(text))


def parse_size(value: int | float | str, total: int) -> int:
    """Bytes from '12GiB', '8GB', '75%', a fraction (0 < f <= 1) of `total`, or a byte count."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '12GiB', '75%' or a fraction like 0.75")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError("a fractional memory budget must be between 0 and 1")
        return int(total * value)
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("size must be positive")
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size (use e.g. '12GiB', '8GB', '75%')")
    number, unit = float(match.group(1)), (match.group(2) or "B").lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError("a percentage must be between 0 and 100")
        return int(total * number / 100)
    if number <= 0:
        raise ValueError("size must be positive")
    return int(number * _SIZE_UNITS[unit])
