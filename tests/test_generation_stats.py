"""The stats a generation reports to observers (metrics) time tokens by when the engine made them.

Fast streams reach the server in batches (engines/worker.Handoff: every 20 ms), so the arrival
times of a batch's tokens are all but equal; inter-token latency and time to first token must come
from the events' own `at`. The registry and engine here are stand-ins that hand over a scripted
stream in one batch: this tests the bookkeeping only (test_observability scrapes the real thing).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mlx_serve.apis.context import GENERATION_OBSERVERS, REGISTRY
from mlx_serve.apis.generation import open_generation
from mlx_serve.engines.types import (
    Finished,
    GenerationRequest,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    Usage,
)
from mlx_serve.profiles.schema import Limits, Sampling


async def test_token_times_are_when_the_engine_made_the_tokens() -> None:
    made = [ReasoningDelta("hm", at=100.0), TextDelta("a", at=100.007), TextDelta("b", at=100.014)]

    class Engine:
        async def generate(self, gen: GenerationRequest):  # type: ignore[no-untyped-def]
            for event in made:  # all arrive at once, ~now: long after they were made
                yield event
            yield Finished("stop", Usage(3, 3))

    class Registry:
        profile = SimpleNamespace(server=SimpleNamespace(limits=Limits()))
        drain_expired = False

        def resolve(self, name: str) -> str:
            return name

        @asynccontextmanager
        async def lease(self, name, keep_alive, priority):  # type: ignore[no-untyped-def]
            yield SimpleNamespace(
                queue_wait=0.0, load_wait=0.0, spec=SimpleNamespace(sampling=Sampling()), engine=Engine()
            )

    reported = []
    app = web.Application()
    app[REGISTRY] = Registry()
    app[GENERATION_OBSERVERS] = [reported.append]
    request = make_mocked_request("POST", "/v1/chat/completions", app=app)
    _, events = await open_generation(
        request, "openai", "m", GenerationRequest(prompt="x", sampling=SamplingParams())
    )
    assert [event async for event in events][:3] == made
    (stats,) = reported
    assert stats.token_times == [100.0, 100.007, 100.014]
    assert stats.first_token_at == 100.0
