"""What the running daemon knows about itself: the profile in force and the last reload outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mlx_serve.apis.redact import redact_home
from mlx_serve.profiles.loader import LoadedProfile, Problem
from mlx_serve.profiles.schema import Profile


@dataclass
class ReloadStatus:
    successful: bool = True
    timestamp: float = field(default_factory=time.time)
    errors: tuple[str, ...] = ()
    summary: str = "initial load"


@dataclass
class DaemonState:
    profile_path: str | None
    loaded: LoadedProfile | None = None
    last_reload: ReloadStatus = field(default_factory=ReloadStatus)
    started_at: float = field(default_factory=time.time)
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0, "unchanged": 0})

    @property
    def profile(self) -> Profile | None:
        return self.loaded.profile if self.loaded else None

    @property
    def profile_label(self) -> str:
        return self.loaded.path if self.loaded else str(self.profile_path or "<none>")

    def set_profile(self, loaded: LoadedProfile, summary: str = "initial load") -> None:
        self.loaded = loaded
        self.last_reload = ReloadStatus(successful=True, summary=summary)

    def set_profile_errors(self, problems: list[Problem]) -> None:
        self.last_reload = ReloadStatus(
            successful=False, errors=tuple(str(p) for p in problems), summary="invalid"
        )

    def profile_report(self) -> dict[str, Any]:
        """For /health, /ready, /status: the home directory shows as ~ (apis/redact.py)."""
        return {
            "path": redact_home(self.profile_label),
            "sha256": self.loaded.sha256 if self.loaded else None,
            "valid": self.loaded is not None,
            "last_reload_successful": self.last_reload.successful,
            "last_reload_at": self.last_reload.timestamp,
            "last_reload_summary": self.last_reload.summary,
            "errors": [redact_home(e) for e in self.last_reload.errors],
        }
