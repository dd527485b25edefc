"""OpenAI Responses API (being implemented)."""

from aiohttp import web


def add_routes(app: web.Application, prefix: str) -> None:
    pass
