"""API keys in the OS keyring: create, list, revoke, rotate.

A key's secret (`msk-` + 32 random bytes, URL-safe base64) is shown once and never stored. The
keyring entry (service from the profile's `[auth] keyring_service`, user `key:NAME`) holds only what
the daemon needs to verify a key: the SHA-256 digest of the secret and the key's scopes, as JSON.
Keyrings cannot enumerate their entries, so a second entry (user `index`) lists the key names.

Backends: the keyring package's automatic choice is a chain that ends in keyrings.alt's plaintext
file when that package is installed, and it picks the plaintext file outright when nothing better
exists. We never fall back to a file: without an explicit choice (PYTHON_KEYRING_BACKEND or
keyringrc.cfg) only a recommended backend (macOS Keychain, Secret Service, KWallet, Windows
Credential Locker) is used, alone. Every keyring failure (locked, missing, broken) becomes
KeyStoreUnavailable with a message saying which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger("mlx_serve.keys")

KEY_PREFIX = "msk-"
DEFAULT_SERVICE = "mlx-serve"
DIALECTS = ("openai", "anthropic", "ollama")
INDEX_USER = "index"
ENTRY_PREFIX = "key:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
MAX_SECRET_CHARS = 256
T = TypeVar("T")


class KeyStoreUnavailable(RuntimeError):
    """The keyring is locked, missing or broken; the message says which and what to do."""


class KeyStoreError(ValueError):
    """A request the key store refuses: bad name or scope, duplicate, unknown key."""


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", errors="surrogateescape")).digest()


@dataclass(frozen=True)
class KeyRecord:
    """What the keyring holds for one key (never the secret)."""

    name: str
    digest: bytes = field(repr=False)
    models: tuple[str, ...] = ()  # globs over requested names and profile ids; empty = every model
    apis: tuple[str, ...] = ()  # dialects; empty = every dialect
    rate_per_min: int | None = None
    created: float = 0.0
    expires: float | None = None
    rotated: float | None = None

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (now if now is not None else time.time()) >= self.expires

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "digest": self.digest.hex(),
                "models": list(self.models),
                "apis": list(self.apis),
                "rate_per_min": self.rate_per_min,
                "created": self.created,
                "expires": self.expires,
                "rotated": self.rotated,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, name: str, text: str) -> KeyRecord:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a version-1 key entry")
        digest = bytes.fromhex(data["digest"])
        if len(digest) != 32:
            raise ValueError("digest is not SHA-256")
        return cls(
            name=name,
            digest=digest,
            models=tuple(str(m) for m in data.get("models") or ()),
            apis=tuple(str(a) for a in data.get("apis") or ()),
            rate_per_min=_opt_int(data.get("rate_per_min")),
            created=float(data.get("created") or 0.0),
            expires=_opt_float(data.get("expires")),
            rotated=_opt_float(data.get("rotated")),
        )

    def public(self) -> dict[str, Any]:
        """Everything but the digest: for `keys list` and the daemon's key status."""
        return {
            "name": self.name,
            "models": list(self.models),
            "apis": list(self.apis),
            "rate_per_min": self.rate_per_min,
            "created": self.created,
            "expires": self.expires,
            "rotated": self.rotated,
        }


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def check_scopes(
    models: Iterable[str], apis: Iterable[str], rate_per_min: int | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    model_globs = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    for glob in model_globs:
        if len(glob) > 128 or any(ch.isspace() for ch in glob):
            raise KeyStoreError(f"model glob {glob!r} must be at most 128 characters without spaces")
    dialects = tuple(dict.fromkeys(a.strip().lower() for a in apis if a.strip()))
    unknown = [a for a in dialects if a not in DIALECTS]
    if unknown:
        raise KeyStoreError(f"unknown API {unknown[0]!r}; choose from {', '.join(DIALECTS)}")
    if rate_per_min is not None and not 1 <= rate_per_min <= 1_000_000:
        raise KeyStoreError("rate must be between 1 and 1000000 requests per minute")
    return model_globs, dialects


# ---- backend choice ------------------------------------------------------------------------------


def backend_label(backend: Any) -> str:
    """The backend's class, never its repr (file backends put a path in it)."""
    return f"{type(backend).__module__}.{type(backend).__qualname__}"


_selected: Any = None


def select_backend() -> Any:
    """The keyring backend to use: the explicitly configured one, else the best recommended one.
    Chosen once per process (a failed choice is retried on the next call)."""
    global _selected
    if _selected is None:
        _selected = _choose_backend()
    return _selected


def _choose_backend() -> Any:
    import keyring.backend
    import keyring.core
    from keyring.backends.chainer import ChainerBackend

    try:
        explicit = keyring.core.load_env() or keyring.core.load_config()
    except Exception as exc:  # an unknown class name in PYTHON_KEYRING_BACKEND or keyringrc.cfg
        raise KeyStoreUnavailable(
            f"the configured keyring backend cannot be loaded ({type(exc).__name__}: {exc})"
        ) from None
    if explicit is not None:
        if explicit.priority < 1:
            log.warning(
                "keyring backend %s is not a recommended (secure) backend; using it because it was "
                "configured explicitly",
                backend_label(explicit),
            )
        return explicit
    found = [
        b for b in keyring.backend.get_all_keyring() if not isinstance(b, ChainerBackend) and b.priority >= 1
    ]
    if not found:
        others = sorted({type(b).__name__ for b in keyring.backend.get_all_keyring()} - {"ChainerBackend"})
        raise KeyStoreUnavailable(
            "no secure keyring is available"
            + (f" (found only {', '.join(others)}, which mlx-serve does not use)" if others else "")
            + "; on Linux start a Secret Service (gnome-keyring, KWallet) in the session, or name a"
            " backend in PYTHON_KEYRING_BACKEND. Keys are never kept in plaintext files"
        )
    return max(found, key=keyring.backend.by_priority)


def _unavailable(exc: BaseException) -> KeyStoreUnavailable:
    from keyring.errors import InitError, KeyringError, KeyringLocked, NoKeyringError

    if isinstance(exc, KeyStoreUnavailable):
        return exc
    if isinstance(exc, KeyringLocked):
        return KeyStoreUnavailable(f"keyring locked ({exc}); unlock it")
    if isinstance(exc, NoKeyringError):
        return KeyStoreUnavailable("no keyring backend is available; keys are never kept in plaintext files")
    if isinstance(exc, InitError):
        return KeyStoreUnavailable(f"keyring cannot be opened ({exc})")
    if isinstance(exc, KeyringError):
        return KeyStoreUnavailable(f"keyring error ({type(exc).__name__}: {str(exc)[:200]})")
    # Anything else comes from inside a backend (D-Bus, a corrupt file, the OS). Its text may quote
    # the store's contents, so only the type is reported.
    return KeyStoreUnavailable(f"keyring backend failed ({type(exc).__name__})")


# ---- the store -----------------------------------------------------------------------------------


class KeyStore:
    def __init__(self, service: str = DEFAULT_SERVICE, backend: Any = None) -> None:
        self.service = service
        self._backend = backend

    @property
    def backend(self) -> Any:
        if self._backend is None:
            self._backend = select_backend()
        return self._backend

    def _call(self, op: Callable[..., T], *args: Any) -> T:
        try:
            return op(*args)
        except Exception as exc:
            from keyring.errors import PasswordDeleteError

            if isinstance(exc, PasswordDeleteError):
                raise
            raise _unavailable(exc) from None

    def _get(self, user: str) -> str | None:
        return self._call(lambda: self.backend.get_password(self.service, user))

    def _set(self, user: str, value: str) -> None:
        self._call(lambda: self.backend.set_password(self.service, user, value))

    def _delete(self, user: str) -> None:
        from keyring.errors import PasswordDeleteError

        try:
            self._call(lambda: self.backend.delete_password(self.service, user))
        except PasswordDeleteError:
            pass  # already gone

    # ---- reading --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        raw = self._get(INDEX_USER)
        if not raw:
            return []
        try:
            names = json.loads(raw)
        except ValueError:
            raise KeyStoreUnavailable("the key index in the keyring is corrupt") from None
        if not isinstance(names, list):
            raise KeyStoreUnavailable("the key index in the keyring is corrupt")
        return [n for n in names if isinstance(n, str) and NAME_RE.match(n)]

    def get(self, name: str) -> KeyRecord | None:
        raw = self._get(ENTRY_PREFIX + name)
        if raw is None:
            return None
        try:
            return KeyRecord.from_json(name, raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("key %r: its keyring entry is unreadable (%s); ignoring it", name, type(exc).__name__)
            return None

    def list(self) -> list[KeyRecord]:
        """Every key the index names; entries that are missing or unreadable are skipped."""
        return [record for name in self.names() if (record := self.get(name)) is not None]

    # ---- changes --------------------------------------------------------------------------------
    def create(
        self,
        name: str,
        models: Iterable[str] = (),
        apis: Iterable[str] = (),
        rate_per_min: int | None = None,
        expires: float | None = None,
    ) -> str:
        """Store a new key; returns its secret, which exists nowhere else afterwards."""
        if not NAME_RE.match(name):
            raise KeyStoreError(
                f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        model_globs, dialects = check_scopes(models, apis, rate_per_min)
        now = time.time()
        if expires is not None and expires <= now:
            raise KeyStoreError("the expiry date is in the past")
        names = self.names()
        if name in names or self._get(ENTRY_PREFIX + name) is not None:
            raise KeyStoreError(f"a key named {name!r} exists; use `keys rotate {name}` for a new secret")
        secret = new_secret()
        record = KeyRecord(name, digest_of(secret), model_globs, dialects, rate_per_min, now, expires)
        self._set(ENTRY_PREFIX + name, record.to_json())  # entry first: a crash leaves no dangling name
        self._set(INDEX_USER, json.dumps([*names, name]))
        return secret

    def revoke(self, name: str) -> KeyRecord:
        names = self.names()
        record = self.get(name)
        if name not in names and record is None:
            raise KeyStoreError(f"no key named {name!r}")
        self._set(INDEX_USER, json.dumps([n for n in names if n != name]))
        self._delete(ENTRY_PREFIX + name)
        return record or KeyRecord(name, b"\0" * 32)

    def rotate(self, name: str) -> str:
        """A new secret for an existing key (same scopes); the old secret stops working."""
        record = self.get(name)
        if record is None or name not in self.names():
            raise KeyStoreError(f"no key named {name!r}")
        secret = new_secret()
        rotated = KeyRecord(
            name, digest_of(secret), record.models, record.apis, record.rate_per_min,
            record.created, record.expires, time.time(),
        )  # fmt: skip
        self._set(ENTRY_PREFIX + name, rotated.to_json())
        return secret
