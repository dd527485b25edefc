"""The daemon's sockets: TCP (host, port) and an optional unix socket, moved live when the profile's
[server] address changes. The new socket opens before the old one closes, and closing a listening
socket leaves its established connections alone, so in-flight requests finish where they started.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("mlx_serve.server")


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    unix_socket: str | None = None

    def __str__(self) -> str:
        tcp = f"http://{self.host}:{self.port}"
        return f"{tcp} and unix:{self.unix_socket}" if self.unix_socket else tcp


class Listener:
    def __init__(self, runner: web.AppRunner, address: Address, pinned: bool = False) -> None:
        self._runner = runner
        self.address = address
        self.pinned = pinned  # --host/--port on the command line win over the profile
        self._sites: list[web.BaseSite] = []

    async def start(self) -> None:
        self._sites = await self._open(self.address)

    async def _open(self, address: Address) -> list[web.BaseSite]:
        sites: list[web.BaseSite] = [web.TCPSite(self._runner, address.host, address.port)]
        if address.unix_socket:
            sites.append(web.UnixSite(self._runner, address.unix_socket))
        opened: list[web.BaseSite] = []
        try:
            for site in sites:
                await site.start()
                opened.append(site)
        except OSError:
            for site in opened:
                await site.stop()
            raise
        return opened

    async def stop(self) -> None:
        for site in self._sites:
            await site.stop()
        self._sites = []

    async def move_to(self, address: Address) -> bool:
        """Listen on `address` instead; on failure keep the current sockets and say why."""
        if address == self.address or self.pinned:
            return False
        try:
            new_sites = await self._open(address)
        except OSError as exc:
            log.error("cannot move the listener to %s (%s); still on %s", address, exc, self.address)
            return False
        for site in self._sites:
            await site.stop()
        log.info("listener moved from %s to %s", self.address, address)
        self._sites, self.address = new_sites, address
        return True


class MetricsListener:
    """The optional separate metrics socket ([metrics] listen), opened, moved or closed on reload."""

    def __init__(self, runner: web.AppRunner) -> None:
        self._runner = runner
        self._listener: Listener | None = None

    @property
    def address(self) -> Address | None:
        return self._listener.address if self._listener else None

    async def follow(self, listen: str | None, *, strict: bool = False) -> None:
        """Match the socket to `listen` ("host:port", or None for no separate listener).

        At start (`strict`) a port that cannot be bound is fatal; on a reload it is logged and the
        daemon keeps serving.
        """
        wanted = parse_listen(listen) if listen else None
        if wanted == self.address:
            return
        if wanted is None:
            await self.close()
            log.info("separate metrics listener closed")
            return
        if self._listener is None:
            listener = Listener(self._runner, wanted)
            try:
                await listener.start()
            except OSError as exc:
                if strict:
                    raise
                log.error("cannot open the metrics listener on %s (%s)", wanted, exc)
                return
            self._listener = listener
            log.info("metrics listener on %s", wanted)
        else:
            await self._listener.move_to(wanted)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None


def parse_listen(listen: str) -> Address:
    host, _, port = listen.rpartition(":")
    return Address(host.strip("[]"), int(port))
