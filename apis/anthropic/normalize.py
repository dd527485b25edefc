"""Prompt normalization for prefix-cache hits on Anthropic-dialect requests.

Claude Code (2.1.36 and later) puts a telemetry line first in its system prompt:

    x-anthropic-billing-header: cc_version=2.1.100.7b4; cc_entrypoint=cli; cch=eb6c6;

Its `cch` value (and the version suffix) change on every request. Being the first tokens of the
prompt, it would make every turn's prompt differ from the last at position ~5 and defeat the prefix
cache for the whole (often 20K-token) conversation. The line is billing metadata for Anthropic's
servers, meaningless to a local model, so it is removed: a system block whose text starts with
`x-anthropic-billing-header:` loses that first line (and the block goes if nothing else is left).
Nothing else in a request is ever rewritten; the README's "Prompt normalization" section says so.
"""

from __future__ import annotations

BILLING_HEADER = "x-anthropic-billing-header:"


def strip_billing_header(text: str) -> str | None:
    """`text` without a leading billing-header line; None when that line was all of it."""
    if not text.lstrip().lower().startswith(BILLING_HEADER):
        return text
    _, _, rest = text.lstrip().partition("\n")
    return rest if rest.strip() else None


def system_texts(blocks) -> list[str]:
    """The system blocks' texts as the model should see them."""
    texts = (strip_billing_header(block.text) for block in blocks)
    return [text for text in texts if text is not None]
