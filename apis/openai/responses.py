"""OpenAI Responses API: `POST /v1/responses`, plain and streaming, with `previous_response_id`.

The request side is in responses_translate.py (wire models) and responses_items.py (input items
-> messages). Here: the `ResponseAssembler` turns engine events into the Response object and its
stream events (one code path for both modes, so the streamed final response equals the plain
one), the per-process LRU store of conversations for `previous_response_id`, and the route.

Stream: response.created, response.in_progress, then per output item output_item.added,
(content_part.added, output_text.delta*, output_text.done, content_part.done) or
(function_call_arguments.delta, .done), output_item.done; finally response.completed, or
response.incomplete (max_output_tokens) or response.failed. Each SSE event has `event: <type>` and
a JSON body with `type` and `sequence_number`. There is no `data: [DONE]` in this API.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mlx_serve.engines.errors import ContextOverflowError
from mlx_serve.engines.types import (
    Event,
    Finished,
    Message,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallEvent,
)

from .. import sse
from ..body import read_body
from ..context import RESPONSE_STORE, limits, registry
from ..errors import ErrorInfo, RequestError, classify, error_body, error_response
from ..generation import open_generation
from . import responses_items as ri
from . import responses_translate as rt
from .routes import _check_generates

log = logging.getLogger("mlx_serve.apis.openai.responses")
DIALECT = "openai"
STORE_LIMIT = 256  # responses kept for previous_response_id, least recently used evicted first
STATUS = {
    "stop": "completed",
    "tool_calls": "completed",
    "length": "incomplete",
    "context_overflow": "incomplete",
}
TERMINAL = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# ---- response side (pure) --------------------------------------------------------------------


def _logprob(lp: TokenLogprob, with_bytes: bool) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"token": token, "logprob": logprob}
        return entry | ({"bytes": list(token.encode("utf-8"))} if with_bytes else {})

    return one(lp.token, lp.logprob) | {"top_logprobs": [one(t, p) for t, p in lp.top]}


def usage_body(finished: Finished) -> dict[str, Any]:
    usage = finished.usage
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},  # engines do not count reasoning tokens apart
        "total_tokens": usage.total_tokens,
    }


@dataclass
class _Open:
    """The output item being streamed: a message (output_text) or reasoning (reasoning_text)."""

    item: dict[str, Any]
    index: int
    text: list[str]
    logprobs: list[TokenLogprob]


class ResponseAssembler:
    """Engine events -> (stream events, final Response). Feed `start()`, then every event; the
    Finished event yields the terminal event, after which `response` is complete."""

    def __init__(
        self,
        response_id: str,
        model: str,
        echo: dict[str, Any],
        logprobs: bool,
        created_at: int | None = None,
    ) -> None:
        self.response: dict[str, Any] = {
            "id": response_id,
            "object": "response",
            "created_at": created_at if created_at is not None else int(time.time()),
            "status": "in_progress",
            "background": False,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "model": model,
            "output": [],
            "service_tier": "default",
            **echo,
        }
        self.logprobs = logprobs
        self.seq = 0
        self._open: _Open | None = None
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCall] = []

    @property
    def status(self) -> str:
        return self.response["status"]

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _snapshot(self, kind: str) -> dict[str, Any]:
        return self.event(kind, response=copy.deepcopy(self.response))

    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        self.response["output"].append(item)
        return self.event(
            "response.output_item.added",
            output_index=len(self.response["output"]) - 1,
            item=copy.deepcopy(item),
        )

    def start(self) -> list[dict[str, Any]]:
        return [self._snapshot("response.created"), self._snapshot("response.in_progress")]

    def _open_item(self, kind: str) -> list[dict[str, Any]]:
        if self._open is not None and self._open.item["type"] == kind:
            return []
        events = self._close("completed")
        if kind == "message":
            item = {
                "id": new_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {
                "id": new_id("rs"),
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            part = {"type": "reasoning_text", "text": ""}
        events.append(self._add(item))
        self._open = _Open(item, len(self.response["output"]) - 1, [], [])
        events.append(self.event("response.content_part.added", **self._where(), part=part))
        return events

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open.item["id"], "output_index": self._open.index, "content_index": 0}

    def _close(self, status: str) -> list[dict[str, Any]]:
        current = self._open
        if current is None:
            return []
        where = self._where()
        text, item = "".join(current.text), current.item
        if item["type"] == "message":
            wire_lps = [_logprob(lp, False) for lp in current.logprobs]
            done = self.event("response.output_text.done", **where, text=text, logprobs=wire_lps)
            part = {
                "type": "output_text",
                "text": text,
                "annotations": [],
                "logprobs": [_logprob(lp, True) for lp in current.logprobs],
            }
        else:
            done = self.event("response.reasoning_text.done", **where, text=text)
            part = {"type": "reasoning_text", "text": text}
        item["content"] = [part]
        item["status"] = status
        self._open = None
        return [
            done,
            self.event("response.content_part.done", **where, part=copy.deepcopy(part)),
            self.event("response.output_item.done", output_index=current.index, item=copy.deepcopy(item)),
        ]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta | ReasoningDelta):
            if not event.text:
                return []
            is_text = isinstance(event, TextDelta)
            events = self._open_item("message" if is_text else "reasoning")
            assert self._open is not None
            self._open.text.append(event.text)
            (self.text if is_text else self.reasoning).append(event.text)
            if not is_text:
                return [
                    *events,
                    self.event("response.reasoning_text.delta", **self._where(), delta=event.text),
                ]
            self._open.logprobs.extend(event.logprobs if self.logprobs else ())
            lps = [_logprob(lp, False) for lp in event.logprobs] if self.logprobs else []
            return [
                *events,
                self.event("response.output_text.delta", **self._where(), delta=event.text, logprobs=lps),
            ]
        if isinstance(event, ToolCallEvent):
            return self._call(event.call)
        return self.finish(event)

    def _call(self, call: ToolCall) -> list[dict[str, Any]]:
        events = self._close("completed")
        self.calls.append(call)
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "call_id": call.id,
            "name": call.name,
            "arguments": "",
            "status": "in_progress",
        }
        events.append(self._add(item))
        where = {"item_id": item["id"], "output_index": len(self.response["output"]) - 1}
        item |= {"arguments": call.arguments, "status": "completed"}
        return [
            *events,
            self.event("response.function_call_arguments.delta", **where, delta=call.arguments),
            self.event(
                "response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments
            ),
            self.event(
                "response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item)
            ),
        ]

    def finish(self, finished: Finished) -> list[dict[str, Any]]:
        status = STATUS.get(finished.reason, "failed")
        events = self._close("incomplete" if status == "incomplete" else "completed")
        if status != "failed" and not self.response["output"]:  # nothing generated: an empty message
            events += self._open_item("message") + self._close(status)
        response = self.response
        response["status"] = status
        response["usage"] = usage_body(finished)
        if status == "completed":
            response["completed_at"] = int(time.time())
        elif status == "incomplete":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            what = (
                "was cancelled"
                if finished.reason == "cancelled"
                else f"failed: {finished.error or 'engine error'}"
            )
            response["error"] = {"code": "server_error", "message": f"generation {what}"}
        return [*events, self._snapshot(TERMINAL[status])]

    def assistant_message(self) -> Message:
        """The output as one assistant turn, for the conversation of a later previous_response_id."""
        return Message(
            role="assistant",
            content="".join(self.text),
            tool_calls=tuple(self.calls),
            reasoning="".join(self.reasoning) or None,
        )


# ---- the store -------------------------------------------------------------------------------


def remember(
    store: dict[str, tuple[Message, ...]], response_id: str, conversation: tuple[Message, ...]
) -> None:
    """Keep a conversation (input + output, without instructions); evict the least recently used."""
    store.pop(response_id, None)
    store[response_id] = conversation
    while len(store) > STORE_LIMIT:
        del store[next(iter(store))]


def recall(store: dict[str, tuple[Message, ...]], response_id: str) -> tuple[Message, ...] | None:
    conversation = store.pop(response_id, None)
    if conversation is not None:
        store[response_id] = conversation  # most recently used now
    return conversation


# ---- the route -------------------------------------------------------------------------------


def _not_found(response_id: str) -> web.Response:
    info = ErrorInfo(
        404, "invalid_request", f"previous response with id {response_id!r} not found", "previous_response_id"
    )
    body = error_body(DIALECT, info)
    body["error"]["code"] = "previous_response_not_found"
    return web.json_response(body, status=404)


async def _stream(
    request: web.Request,
    events: AsyncIterator[Event],
    assembler: ResponseAssembler,
    on_done: Callable[[], None],
) -> web.StreamResponse:
    response = await sse.open_stream(request)
    try:
        for out in assembler.start():
            await sse.send(response, out, event=out["type"])
        async for event in events:
            for out in assembler.feed(event):
                await sse.send(response, out, event=out["type"])
        on_done()
        await sse.finish(response)
    except sse.ClientGone:
        log.debug("client left %s mid-stream", request.path)
    except Exception as exc:  # the status line is gone: report in the stream
        info = classify(exc)
        if info.kind == "internal":
            log.exception("stream on %s failed", request.path)
        wire = error_body(DIALECT, info)["error"]
        error = assembler.event("error", code=wire["code"], message=wire["message"], param=wire["param"])
        try:
            await sse.send(response, error, event="error")
        except sse.ClientGone:
            pass
    return response


async def create_response(request: web.Request) -> web.StreamResponse:
    created_at = int(time.time())
    body = await read_body(request, rt.ResponsesRequest)
    rt.check_request(body, limits(request))
    items = ri.parse_items(body.input)
    _check_generates(request, body.model)  # unknown model (404) or an embedding model (400)
    store = request.app[RESPONSE_STORE]
    history: tuple[Message, ...] = ()
    if body.previous_response_id is not None:
        found = recall(store, body.previous_response_id)
        if found is None:
            return _not_found(body.previous_response_id)
        history = found
    conversation = history + ri.to_messages(items, history)
    gen = rt.generation_request(body, conversation)
    try:
        model_id, events = await open_generation(request, DIALECT, body.model, gen)
    except ContextOverflowError as exc:  # name the field this API calls it by
        raise RequestError(str(exc), "input", kind="context_length_exceeded") from None
    spec = registry(request).profile.models.get(model_id)
    echo = rt.echo_fields(body, spec.sampling if spec is not None else None)
    assembler = ResponseAssembler(new_id("resp"), model_id, echo, body.wants_logprobs, created_at)

    def on_done() -> None:
        if body.store is not False and assembler.status in ("completed", "incomplete"):
            remember(store, assembler.response["id"], conversation + (assembler.assistant_message(),))

    async with aclosing(events):
        if body.stream:
            return await _stream(request, events, assembler, on_done)
        assembler.start()
        async for event in events:
            assembler.feed(event)
    if assembler.status == "failed":
        return error_response(DIALECT, ErrorInfo(500, "internal", assembler.response["error"]["message"]))
    on_done()
    return web.json_response(assembler.response)


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_post(f"{prefix}/v1/responses", create_response)
