"""The streaming HTTP client every server is measured with: OpenAI chat completions over SSE.

Tokens delivered are `usage.completion_tokens` when the server reports usage in the stream
(stream_options.include_usage), else the number of chunks that carried content. A stream is
complete when a finish reason arrived; one that ends without it was cut short (llama_cpp.server
ends an interrupted stream with a bare [DONE]); a transport or HTTP error is an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp
from common import StreamResult

TIMEOUT = aiohttp.ClientTimeout(total=900, sock_read=600)


def chat_body(model: str, prompt: str | list[dict], max_tokens: int) -> dict:
    """A greedy streaming chat request; `prompt` is the user message, or a whole message list."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def completion_body(model: str, prompt: str, max_tokens: int, **extra: object) -> dict:
    """A greedy streaming /v1/completions request (extra: e.g. suffix= for fill-in-the-middle)."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


def _path(body: dict) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


async def stream_chat(
    session: aiohttp.ClientSession, url: str, body: dict, on_first: Callable[[], None] | None = None
) -> StreamResult:
    """Stream one chat (body has messages) or completions (body has prompt) request; on_first()
    is called when its first content arrives."""
    t0 = time.perf_counter()
    first = last = None
    chunks, usage, finish, done = 0, None, None, False
    parts: list[str] = []
    prompt_tokens = cached = None
    try:
        async with session.post(url + _path(body), json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                return StreamResult(0, None, None, False, error=f"HTTP {resp.status}: {text}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage = event["usage"].get("completion_tokens", usage)
                    prompt_tokens = event["usage"].get("prompt_tokens", prompt_tokens)
                    cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", cached)
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if piece:
                        parts.append(piece)
                        if first is None and on_first is not None:
                            on_first()
                        now = time.perf_counter() - t0
                        first = now if first is None else first
                        last, chunks = now, chunks + 1
                    finish = choice.get("finish_reason") or finish
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
        return StreamResult(chunks, first, last, False, error=error, text="".join(parts))
    tokens, counted_by = (usage, "usage") if usage is not None else (chunks, "chunks")
    error = None if done or finish else "stream ended without [DONE]"
    complete = finish is not None and error is None
    return StreamResult(
        tokens, first, last, complete, error, finish, counted_by, "".join(parts), prompt_tokens, cached
    )


async def _many(url: str, bodies: list[dict]) -> tuple[list[StreamResult], float]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(session, url, b) for b in bodies))
        return list(results), time.perf_counter() - t0


def run_streams(url: str, bodies: list[dict]) -> tuple[list[StreamResult], float]:
    """Send every body at once; return each stream's result and the wall time until the last ended."""
    return asyncio.run(_many(url, bodies))


def session() -> aiohttp.ClientSession:
    """A client session for async workloads (one connection per request, like run_streams)."""
    return aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0, force_close=True))


async def keep_streaming(
    http: aiohttp.ClientSession,
    url: str,
    make_body: Callable[[int], dict],
    stop: asyncio.Event,
    on_first: Callable[[], None] | None = None,
) -> list[StreamResult]:
    """One client streaming request after request (make_body(i) for the i-th) until `stop` is set;
    the request running then finishes normally. on_first(): called at the first content of each.
    Returns every request's result."""
    results: list[StreamResult] = []
    while not stop.is_set():
        results.append(await stream_chat(http, url, make_body(len(results)), on_first))
    return results
