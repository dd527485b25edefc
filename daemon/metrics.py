"""Prometheus metrics (prefix mlx_serve_, base units, bounded labels).

Labels are only profile model ids (aliases resolved; a request for an unknown name never creates
a series), engine, dialect, the route template as endpoint, status class and finish reason.
State that already lives somewhere (model residency, memory, queue depth) is read at scrape time
by a collector instead of being mirrored into gauges that could drift.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import get_args

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mlx_serve.apis.generation import GenerationStats
from mlx_serve.daemon import __version__
from mlx_serve.daemon.registry import Registry
from mlx_serve.daemon.slot import Slot, SlotState
from mlx_serve.daemon.state import DaemonState
from mlx_serve.engines.kind import engine_kind
from mlx_serve.engines.sources.progress import DownloadEvent, add_progress_listener
from mlx_serve.engines.types import FinishReason

disable_created_metrics()  # *_created series double the output and no dashboard uses them
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# Bounded label values. Unload reasons come from the registry and the dialects ("keep_alive 0" is
# Ollama's manual unload); anything unexpected is "other" rather than a new free-form label value.
UNLOAD_REASONS = ("ttl", "pressure", "reload", "removed", "manual", "shutdown")
_UNLOAD_ALIASES = {"keep_alive 0": "manual"}
# Auth failure reasons (daemon/security/middleware.py's AuthFailure reasons and daemon/security/hardening.py's refusals)
# are exported at 0 from the start, so dashboards and alerts see the series before the first one.
AUTH_FAILURE_REASONS = (
    "missing",
    "invalid",
    "expired",
    "scope",
    "rate_limited",
    "keyring_unavailable",
    "host",
    "origin",
)
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


class Metrics:
    def __init__(self, state: DaemonState, registry: Registry) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mlx_serve_requests", "HTTP requests", ["dialect", "endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "mlx_serve_request_duration_seconds", "HTTP request duration", ["dialect", "endpoint"],
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "mlx_serve_time_to_first_token_seconds", "Time to first token", ["model", "dialect"],
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "mlx_serve_inter_token_latency_seconds", "Time between streamed tokens", ["model"],
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "mlx_serve_queue_wait_seconds", "Wait for a free slot on a loaded model", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.load_wait = Histogram(
            "mlx_serve_model_load_wait_seconds", "Wait for the model to load", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "mlx_serve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "mlx_serve_prompt_tokens_cached", "Prompt tokens served from cache", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "mlx_serve_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.request_prompt_tokens = Histogram(
            "mlx_serve_request_prompt_tokens",
            "Prompt tokens per request",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "mlx_serve_request_generation_tokens", "Generated tokens per request", ["model"],
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.finish = Counter(
            "mlx_serve_finish_reasons", "Generations by finish reason", ["model", "reason"], registry=r
        )
        self.drafted = Counter(
            "mlx_serve_speculative_drafted_tokens", "Draft tokens proposed", ["model"], registry=r
        )
        self.accepted = Counter(
            "mlx_serve_speculative_accepted_tokens", "Draft tokens accepted", ["model"], registry=r
        )
        self.loads = Counter("mlx_serve_model_loads", "Model loads", ["model", "engine"], registry=r)
        self.load_failures = Counter(
            "mlx_serve_model_load_failures", "Failed model loads", ["model"], registry=r
        )
        self.unloads = Counter("mlx_serve_model_unloads", "Model unloads", ["model", "reason"], registry=r)
        self.load_duration = Histogram(
            "mlx_serve_model_load_duration_seconds",
            "Model load time",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.reload_ok = Gauge(
            "mlx_serve_config_last_reload_successful", "1 if the last profile reload worked", registry=r
        )
        self.reload_time = Gauge(
            "mlx_serve_config_last_reload_timestamp_seconds",
            "Time of the last profile reload attempt",
            registry=r,
        )
        self.reloads = Counter("mlx_serve_config_reloads", "Profile reloads", ["result"], registry=r)
        self.auth_failures = Counter(
            "mlx_serve_auth_failures", "Rejected requests by reason", ["reason"], registry=r
        )
        self.rate_limited = Counter(
            "mlx_serve_rate_limited", "Requests refused by a key's rate limit", registry=r
        )
        self.download_bytes = Counter(
            "mlx_serve_download_bytes", "Bytes downloaded for model sources", ["model"], registry=r
        )
        self.downloads = Gauge("mlx_serve_downloads_in_progress", "Model downloads running", registry=r)
        build = Gauge(
            "mlx_serve_build_info",
            "Versions",
            ["version", "mlx", "mlx_lm", "llama_cpp_python", "python"],
            registry=r,
        )
        build.labels(
            __version__, _package_version("mlx"), _package_version("mlx-lm"),
            _package_version("llama-cpp-python"), platform.python_version(),
        ).set(1)  # fmt: skip
        for result in ("success", "failure", "unchanged"):
            self.reloads.labels(result)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        r.register(_StateCollector(state, registry))
        self._state = state
        self._registry = registry
        self.init_model_series()
        self.record_reload("success" if state.last_reload.successful else "failure", count=False)
        registry.listeners.append(self.on_model_event)
        add_progress_listener(self.on_download)  # held weakly: a discarded Metrics unsubscribes itself

    def init_model_series(self) -> None:
        """Export every profile model's counters at 0 before its first event. A counter born at 1
        hides that first event from rate()/increase() (Prometheus never saw the 0), so a one-off
        eviction or load failure would never show on the dashboard or trip an alert. Bounded:
        profile models times fixed reason sets; called at start and after each applied reload."""
        for slot in self._registry.slots():
            model = slot.model_id
            for counter in (
                self.prompt_tokens, self.cached_tokens, self.generation_tokens,
                self.drafted, self.accepted, self.load_failures,
            ):  # fmt: skip
                counter.labels(model)
            self.loads.labels(model, engine_kind(slot.spec))
            for reason in FINISH_REASONS:
                self.finish.labels(model, reason)
            for reason in UNLOAD_REASONS:
                self.unloads.labels(model, reason)

    # ---- observers ------------------------------------------------------------------------
    def on_generation(self, stats: GenerationStats) -> None:
        model = stats.model_id
        self.queue_wait.labels(model).observe(stats.queue_wait)
        self.load_wait.labels(model).observe(stats.load_wait)
        if stats.ttft is not None:
            self.ttft.labels(model, stats.dialect).observe(stats.ttft)
        times = stats.token_times
        for earlier, later in zip(times, times[1:], strict=False):
            self.itl.labels(model).observe(later - earlier)
        if stats.cancelled or stats.finished is None:
            self.finish.labels(model, "cancelled").inc()
            return
        usage = stats.finished.usage
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.cached_tokens.labels(model).inc(usage.cached_prompt_tokens)
        self.generation_tokens.labels(model).inc(usage.completion_tokens)
        self.request_prompt_tokens.labels(model).observe(usage.prompt_tokens)
        self.request_generation_tokens.labels(model).observe(usage.completion_tokens)
        self.finish.labels(model, stats.finished.reason).inc()
        if usage.drafted_tokens:
            self.drafted.labels(model).inc(usage.drafted_tokens)
            self.accepted.labels(model).inc(usage.accepted_draft_tokens)

    def on_model_event(self, event: str, reason: str, slot: Slot) -> None:
        if event == "load":
            self.loads.labels(slot.model_id, engine_kind(slot.spec)).inc()
            self.load_duration.labels(slot.model_id).observe(slot.load_seconds)
        elif event == "load_failed":
            self.load_failures.labels(slot.model_id).inc()
        elif event == "unload":
            self.unloads.labels(slot.model_id, unload_reason(reason)).inc()

    def on_download(self, event: DownloadEvent) -> None:  # called on the downloading thread
        if event.kind == "start":
            self.downloads.inc()
        elif event.kind in ("done", "failed"):
            self.downloads.dec()
        elif event.delta > 0:
            self.download_bytes.labels(event.model_id).inc(event.delta)

    def record_reload(self, result: str, count: bool = True) -> None:
        if count:
            self.reloads.labels(result).inc()
        if result == "success":
            self.init_model_series()  # models added by the reload
        if result != "unchanged" or count:
            self.reload_ok.set(1 if self._state.last_reload.successful else 0)
            self.reload_time.set(self._state.last_reload.timestamp)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Model residency, memory and queues, read from the registry at scrape time."""

    def __init__(self, state: DaemonState, registry: Registry) -> None:
        self._state = state
        self._registry = registry

    def collect(self) -> Iterable[GaugeMetricFamily]:
        loaded = GaugeMetricFamily(
            "mlx_serve_model_loaded", "1 if the model is in memory", labels=["model", "engine"]
        )
        failed = GaugeMetricFamily(
            "mlx_serve_model_failed", "1 if the model's last load failed", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "mlx_serve_model_memory_bytes",
            "Memory a model holds, by kind: weights or kv_cache (prefix caches included)",
            labels=["model", "kind"],
        )
        running = GaugeMetricFamily("mlx_serve_requests_running", "Requests generating", labels=["model"])
        waiting = GaugeMetricFamily(
            "mlx_serve_requests_waiting", "Requests queued or waiting for a load", labels=["model"]
        )
        for slot in self._registry.slots():
            loaded.add_metric(
                [slot.model_id, engine_kind(slot.spec)], 1 if slot.state == SlotState.LOADED else 0
            )
            failed.add_metric([slot.model_id], 1 if slot.state == SlotState.FAILED else 0)
            for kind, size in slot.memory_breakdown().items():
                memory.add_metric([slot.model_id, kind], size)
            running.add_metric([slot.model_id], slot.active)
            waiting.add_metric([slot.model_id], slot.waiting)
        yield from (loaded, failed, memory, running, waiting)
        yield GaugeMetricFamily(
            "mlx_serve_memory_budget_bytes", "Memory budget", value=self._registry.budget_bytes
        )
        used = sum(s.memory_bytes() for s in self._registry.slots())
        yield GaugeMetricFamily("mlx_serve_models_memory_bytes", "Memory held by all models", value=used)
        yield GaugeMetricFamily("mlx_serve_process_resident_memory_bytes", "Process RSS", value=_rss_bytes())
        info = GaugeMetricFamily("mlx_serve_profile_info", "The profile in force", labels=["sha256"])
        info.add_metric([(self._state.loaded.sha256[:16] if self._state.loaded else "none")], 1)
        yield info
        yield GaugeMetricFamily(
            "mlx_serve_uptime_seconds", "Seconds since start", value=time.time() - self._state.started_at
        )
        yield from _mlx_memory()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource  # macOS: ru_maxrss is the peak, in bytes; the best the stdlib offers

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _mlx_memory() -> Iterable[GaugeMetricFamily]:
    import sys

    mx = sys.modules.get("mlx.core")  # only when an MLX engine is in use: never import MLX for a scrape
    if mx is None:
        return
    family = GaugeMetricFamily("mlx_serve_mlx_memory_bytes", "MLX allocator memory", labels=["kind"])
    for kind, getter in (
        ("active", "get_active_memory"),
        ("peak", "get_peak_memory"),
        ("cache", "get_cache_memory"),
    ):
        fn = getattr(mx, getter, None)
        if fn is not None:
            family.add_metric([kind], fn())
    yield family


def unload_reason(reason: str) -> str:
    reason = _UNLOAD_ALIASES.get(reason, reason)
    return reason if reason in UNLOAD_REASONS else "other"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def endpoint_of(request: web.Request) -> str:
    """The matched route template (a fixed set), never the raw path."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"
