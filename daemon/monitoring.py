"""The monitoring assets shipped with the package: a Grafana dashboard, a Prometheus scrape config
and alert rules (daemon/assets/). `mlx-serve monitoring export DIR` writes them for the user, with
the scrape target taken from the profile so the snippet points at this daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

DASHBOARD = "grafana-dashboard.json"
SCRAPE_CONFIG = "prometheus-scrape.yml"
ALERT_RULES = "alert-rules.yml"
ASSETS = (DASHBOARD, SCRAPE_CONFIG, ALERT_RULES)
DEFAULT_TARGET = "127.0.0.1:11435"
DEFAULT_PATH = "/metrics"


def asset_text(name: str) -> str:
    if name not in ASSETS:
        raise KeyError(name)
    return (files("mlx_serve.daemon") / "assets" / name).read_text(encoding="utf-8")


def scrape_config_text(target: str = DEFAULT_TARGET, path: str = DEFAULT_PATH) -> str:
    """The shipped scrape config pointed at `target` (host:port) and `path`."""
    text = asset_text(SCRAPE_CONFIG)
    text = text.replace(f'targets: ["{DEFAULT_TARGET}"]', f'targets: ["{target}"]')
    return text.replace(f"metrics_path: {DEFAULT_PATH}", f"metrics_path: {path}")


def target_for(host: str, port: int) -> str:
    """A scrape address for a bind address: wildcard binds are scraped over loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host.strip('[]')}]:{port}" if ":" in host.strip("[]") else f"{host}:{port}"


@dataclass(frozen=True)
class ScrapeTarget:
    target: str = DEFAULT_TARGET
    path: str = DEFAULT_PATH


def target_from_profile(profile) -> ScrapeTarget:
    """Where a daemon running `profile` serves /metrics (its own listener, else the main port)."""
    metrics = profile.metrics
    if metrics.listen:
        host, _, port = metrics.listen.rpartition(":")
        return ScrapeTarget(target_for(host, int(port)), metrics.path)
    return ScrapeTarget(target_for(profile.server.host, profile.server.port), metrics.path)


def export(directory: Path, *, force: bool = False, scrape: ScrapeTarget | None = None) -> list[Path]:
    """Write the three assets into `directory`; refuses to overwrite any of them unless `force`."""
    scrape = scrape or ScrapeTarget()
    paths = [directory / name for name in ASSETS]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(", ".join(str(p) for p in existing))
    directory.mkdir(parents=True, exist_ok=True)
    for path in paths:
        text = (
            scrape_config_text(scrape.target, scrape.path)
            if path.name == SCRAPE_CONFIG
            else asset_text(path.name)
        )
        path.write_text(text, encoding="utf-8")
    return paths
