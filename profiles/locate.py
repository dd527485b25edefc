"""Find the line of a dotted key in TOML text, for error messages (tomllib keeps no positions)."""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(
    r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*="
)
_INLINE_KEY = re.compile(r"[{,]\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+)\s*=")
_KEY_PART = re.compile(r"\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+")


def _split(dotted: str) -> list[str]:
    return [p.strip("\"'") for p in _KEY_PART.findall(dotted)]


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map every key path the text defines (tables, keys, inline-table keys) to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = tuple(_split(header.group(1)))
            lines.setdefault(table, number)
            continue
        assign = _ASSIGN.match(line)
        if not assign:
            continue
        path = table + tuple(_split(assign.group(1)))
        lines.setdefault(path, number)
        rest = line[assign.end() :]
        if "{" in rest:
            for inner in _INLINE_KEY.finditer(rest):
                lines.setdefault(path + (inner.group(1).strip("\"'"),), number)
    return lines


def locate_key(text: str, dotted: str) -> int | None:
    """Line of `dotted` (e.g. 'models.chat.kv_cache.bits' or 'models.chat.aliases[1]'), else of
    its nearest defined parent; None when nothing of it is in the text."""
    path = tuple(_split(re.sub(r"\[\d+\]", "", dotted)))
    lines = key_lines(text)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None
