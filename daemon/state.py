"""What the running daemon knows about itself: the profile in force and the last reload outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mlx_serve.profiles.loader import LoadedProfile, Problem
from mlx_serve.profiles.schema import Profile


@dataclass
class ReloadStatus:
    successful: bool = True
    timestamp: float = field(default_factory=time.time)
    errors: tuple[str, ...] = ()


@dataclass
class DaemonState:
    profile_path: str | None
    loaded: LoadedProfile | None = None
    last_reload: ReloadStatus = field(default_factory=ReloadStatus)
    started_at: float = field(default_factory=time.time)

    @property
    def profile(self) -> Profile | None:
        return self.loaded.profile if self.loaded else None

    @property
    def profile_label(self) -> str:
        return self.loaded.path if self.loaded else str(self.profile_path or "<none>")

    def set_profile(self, loaded: LoadedProfile) -> None:
        self.loaded = loaded
        self.last_reload = ReloadStatus(successful=True)

    def set_profile_errors(self, problems: list[Problem]) -> None:
        self.last_reload = ReloadStatus(successful=False, errors=tuple(str(p) for p in problems))
