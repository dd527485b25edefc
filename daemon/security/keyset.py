"""The daemon's copy of the API key set, read from the keyring, never per request.

It is read at start, after every successful profile reload, on `POST /keys/refresh` (loopback only;
`mlx-serve keys ...` calls it after a change) and every `[auth] refresh_interval` seconds. Keyring
calls run on a worker thread.

If the keyring is locked, missing or broken the set is emptied (a locked keyring locks the keys
too), `error` says why, and the periodic refresh retries; request checks (security/check.py) then
refuse key-protected access with a 503 that quotes `error`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from mlx_serve.daemon.security.keys import KeyRecord, KeyStore, KeyStoreUnavailable, backend_label
from mlx_serve.daemon.security.policy import is_loopback_host
from mlx_serve.daemon.state import DaemonState
from mlx_serve.profiles.schema import Auth

log = logging.getLogger("mlx_serve.auth")
LOAD_TIMEOUT = 30.0  # a keyring that does not answer (a prompt nobody sees) counts as unavailable
FIRST_LOAD_WAIT = 10.0  # how long startup waits for the first load before serving without keys


class KeySet:
    def __init__(self, state: DaemonState) -> None:
        self.state = state
        self.records: tuple[KeyRecord, ...] = ()
        self.error: str | None = "the key set has not been loaded yet"
        self.loaded_at: float | None = None
        self._load_lock = asyncio.Lock()
        self._loads: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._logged_error: str | None = None

    @property
    def settings(self) -> Auth:
        profile = self.state.profile
        return profile.auth if profile is not None else Auth()

    async def refresh(self) -> dict[str, Any]:
        """Re-read the key set now. Loads run one at a time and each starts after its call, so a
        refresh asked for after a `keys` change never returns the result of an older read. A
        cancelled caller (a timeout) does not cancel the load."""
        task = asyncio.ensure_future(self._load_serialized())
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        await asyncio.shield(task)
        return self.report()

    async def _load_serialized(self) -> None:
        async with self._load_lock:
            await self._load()

    async def _load(self) -> None:
        service = self.settings.keyring_service
        store = KeyStore(service)
        try:
            records = await asyncio.wait_for(asyncio.to_thread(store.list), LOAD_TIMEOUT)
        except TimeoutError:
            self._set_unavailable(f"the keyring did not answer within {LOAD_TIMEOUT:.0f}s")
            return
        except KeyStoreUnavailable as exc:
            self._set_unavailable(str(exc))
            return
        changed = {(r.name, r.digest) for r in records} != {(r.name, r.digest) for r in self.records}
        self.records = tuple(records)
        self.loaded_at = time.time()
        if self.error is not None and self._logged_error is not None:
            log.info("API keys are available again")
        first, self.error, self._logged_error = self.error is not None, None, None
        if changed or first:  # the periodic refresh stays quiet while nothing changes
            log.info(
                "API keys: %d loaded from keyring service %r (%s)",
                len(records), service, backend_label(store.backend),
            )  # fmt: skip

    def _set_unavailable(self, message: str) -> None:
        self.records = ()  # fail closed: a locked keyring locks the keys it holds
        self.error = message
        if message != self._logged_error:
            # Loud only when someone may need a key: a loopback-only daemon under the default
            # policy serves everyone without one.
            profile = self.state.profile
            needed = self.settings.require_keys == "always" or (
                profile is not None and not is_loopback_host(profile.server.host)
            )
            log.log(
                logging.WARNING if needed else logging.INFO,
                "API keys are unavailable: %s; key-protected access is refused, retrying every %.0fs",
                message, self.settings.refresh_interval,
            )  # fmt: skip
            self._logged_error = message

    def request_refresh(self) -> None:
        self._wake.set()

    def on_reload(self, result: str) -> None:
        """Reloader listener: the profile may name another keyring service or policy."""
        if result == "success":
            self.request_refresh()

    async def _periodic(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.refresh_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if self.settings.require_keys == "never":
                continue
            try:
                await self.refresh()
            except Exception:  # never let the refresher die
                log.exception("API key refresh failed")

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: first load before serving (bounded), then the refresher."""
        if self.settings.require_keys != "never":
            try:
                await asyncio.wait_for(self.refresh(), FIRST_LOAD_WAIT)
            except TimeoutError:
                log.warning("the keyring is slow to answer; serving while API keys load")
        task = asyncio.create_task(self._periodic())
        yield
        task.cancel()

    def report(self) -> dict[str, Any]:
        return {
            "available": self.error is None,
            "error": self.error,
            "keys": len(self.records),
            "loaded_at": self.loaded_at,
            "service": self.settings.keyring_service,
            "require_keys": self.settings.require_keys,
        }
