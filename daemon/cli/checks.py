"""`mlx-serve doctor`: checks that explain what is wrong and how to fix it.

Each check returns one Check (OK / WARN / FAIL / SKIP, a message, a fix for anything not OK).
FAIL means the daemon cannot work as configured; WARN means it works but something deserves a look.
Checks never change anything, never download and never load a model.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from mlx_serve.engines.sources.paths import home
from mlx_serve.launchd import service as svc
from mlx_serve.launchd.launchctl import ServiceError
from mlx_serve.profiles.loader import DEFAULT_PROFILE_PATH, LoadedProfile, ProfileError, load_profile
from mlx_serve.profiles.schema import Profile

GiB = 1 << 30
PACKAGES = ("mlx", "mlx-lm", "llama-cpp-python")
KEYRING_TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    status: str  # OK | WARN | FAIL | SKIP
    message: str
    fix: str = ""
    details: tuple[str, ...] = ()
    name: str = ""  # filled in by run_checks from the function name


@dataclass
class Context:
    profile_path: Path | None = None
    port: int | None = None
    manager: str | None = None
    loaded: LoadedProfile | None = None  # set by check_profile; later checks use its settings
    probes: dict[str, svc.HealthProbe] = field(default_factory=dict)

    @property
    def profile(self) -> Profile:
        return self.loaded.profile if self.loaded else Profile()

    @property
    def address(self) -> tuple[str, int]:
        return self.profile.server.host, self.port if self.port is not None else self.profile.server.port

    def probe(self, path: str = "/health") -> svc.HealthProbe:
        """The daemon's answer on `path`, asked once per run (a silent listener costs a timeout)."""
        if path not in self.probes:
            self.probes[path] = svc.probe_health(*self.address, path=path)
        return self.probes[path]


def check_python(ctx: Context) -> Check:
    found, missing = [f"Python {sys.version.split()[0]}"], []
    for name in ("mlx-serve", *PACKAGES):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        return Check("FAIL", f"missing {', '.join(missing)}", "pip install --upgrade mlx-serve")
    return Check("OK", ", ".join(found))


def check_mlx(ctx: Context) -> Check:
    extra = "mlx" if sys.platform == "darwin" else "'mlx[cpu]'"
    try:
        import mlx.core as mx

        device = mx.default_device()
        mx.eval(mx.array([1.0, 2.0]) + 1)
    except Exception as exc:  # ImportError, a missing backend (RuntimeError), a broken wheel (OSError)
        return Check("FAIL", f"MLX does not work: {exc}", f"pip install --force-reinstall {extra}")
    kind = "gpu" if device.type == mx.gpu else "cpu"
    if sys.platform != "darwin":
        return Check("OK", f"{kind} device (CPU backend; Metal exists only on macOS)")
    if kind == "gpu" and mx.metal.is_available():
        return Check("OK", "Metal GPU device")
    fix = "use an arm64 Python, not one under Rosetta (`uname -m` in its shell must say arm64)"
    return Check("WARN", f"MLX runs on the {kind}, Metal is not available", fix)


def check_profile(ctx: Context) -> Check:
    path = ctx.profile_path or (DEFAULT_PROFILE_PATH if DEFAULT_PROFILE_PATH.exists() else None)
    try:
        ctx.loaded = load_profile(path)
    except ProfileError as exc:
        problems = tuple(str(p) for p in exc.problems)
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        fix = f"edit the lines shown; check again with: mlx-serve config validate {path}"
        if any(p.message == "profile file not found" for p in exc.problems):
            fix = "create it with: mlx-serve config init"
        return Check("FAIL", f"invalid profile: {problems[0]}{more}", fix, problems)
    models = ", ".join(ctx.loaded.profile.models) or "no models"
    return Check("OK", f"{ctx.loaded.path} is valid ({models})")


def _hub_snapshot(repo: str) -> Path | None:
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1] if found else None


def model_size(model_id: str, profile: Profile) -> int | None:
    """Bytes on disk of a model's weights, or None if not known without downloading."""
    from mlx_serve.engines.sources.resolve import is_local_source, resolve_source

    spec = profile.models[model_id]
    try:
        if spec.source.startswith("package:") or is_local_source(spec.source):
            path: Path | None = resolve_source(model_id, spec)
        else:
            path = _hub_snapshot(spec.source)
    except Exception:
        return None
    if path is None or path.is_file():
        return path.stat().st_size if path else None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def wired_verdict(limit: int, sizes: dict[str, int | None], resident: set[str]) -> Check:
    """Model sizes against the Metal wired-memory limit (pure, so it is tested on any OS)."""
    known = {m: s for m, s in sizes.items() if s is not None}
    gib = f"wired limit {limit / GiB:.1f} GiB"
    unknown = f"; {len(sizes) - len(known)} not downloaded yet" if len(known) < len(sizes) else ""
    if not known:
        return Check("OK", gib + unknown)
    big, size = max(known.items(), key=lambda kv: kv[1])
    fix = f"sudo sysctl iogpu.wired_limit_mb={int(size * 1.2) >> 20} (lasts until reboot), or quantize more"
    if size > limit:
        return Check("FAIL", f"{big} ({size / GiB:.1f} GiB) does not fit the Metal {gib}", fix)
    resident_total = sum(known.get(m, 0) for m in resident)
    if size > 0.9 * limit or resident_total > limit:
        msg = f"{big} {size / GiB:.1f} GiB, pinned+preloaded {resident_total / GiB:.1f} GiB, {gib}"
        return Check("WARN", msg, fix)
    return Check("OK", f"largest model {big} {size / GiB:.1f} GiB, {gib}{unknown}")


def check_metal(ctx: Context) -> Check:
    if sys.platform != "darwin":
        return Check("SKIP", "not macOS: there is no Metal wired-memory limit to check")
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        limit = int(info.get("max_recommended_working_set_size", 0))
        out = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True).stdout
        wired_mb = int(out) if out.strip().isdigit() else 0  # 0: macOS's default limit
    except Exception as exc:
        return Check("WARN", f"cannot read the Metal limits: {exc}", "run doctor from an arm64 Python")
    models = ctx.profile.models
    sizes = {m: model_size(m, ctx.profile) for m in models}
    resident = {m for m, spec in models.items() if spec.pin or spec.preload}
    return wired_verdict(wired_mb << 20 if wired_mb > 0 else limit, sizes, resident)


def _bind_error(host: str, port: int) -> OSError | None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio: TIME_WAIT is not taken
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def check_port(ctx: Context) -> Check:
    host, port = ctx.address
    where = f"{host}:{port}"
    error = _bind_error(host, port)
    if error is None:
        return Check("OK", f"{where} is free (no daemon running there)")
    if error.errno != errno.EADDRINUSE:
        fix = "use a port above 1023" if error.errno == errno.EACCES else "set server.host to a local address"
        return Check("FAIL", f"cannot listen on {where}: {error.strerror}", fix)
    probe = ctx.probe()
    if probe.ours and probe.body:
        return Check("OK", f"{where} is held by the mlx-serve daemon (version {probe.body.get('version')})")
    fix = f"find it with `lsof -nP -iTCP:{port} -sTCP:LISTEN` and stop it, or set server.port in the profile"
    why = probe.error or "it does not answer /health like mlx-serve"
    return Check("FAIL", f"{where} is used by another program ({why})", fix)


def _keyring_probe(service: str) -> tuple[str, BaseException | None]:
    """The backend's name and what a harmless read raised (run on a thread: a prompt may hang)."""
    result: dict[str, object] = {}

    def probe() -> None:
        try:
            import keyring

            backend = keyring.get_keyring()
            result["backend"] = f"{type(backend).__module__}.{type(backend).__name__}"
            backend.get_password(service, "mlx-serve-doctor-probe")  # an entry that does not exist
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=probe, name="doctor-keyring", daemon=True)
    thread.start()
    thread.join(KEYRING_TIMEOUT)
    backend = str(result.get("backend", "?"))
    if thread.is_alive():
        return backend, TimeoutError(f"no answer in {KEYRING_TIMEOUT:.0f}s (is a password prompt open?)")
    error = result.get("error")
    return backend, error if isinstance(error, BaseException) else None


def check_keyring(ctx: Context) -> Check:
    from keyring.errors import KeyringLocked, NoKeyringError

    backend, error = _keyring_probe(ctx.profile.auth.keyring_service)
    mac = sys.platform == "darwin"
    if isinstance(error, KeyringLocked):
        message = f"the keyring is locked ({backend})"
        fix = "unlock the login keychain" if mac else "unlock the Secret Service keyring (desktop login)"
    elif isinstance(error, NoKeyringError):
        message = f"no usable keyring backend ({backend}: {error})"
        fix = "use your login session's keychain" if mac else "install and unlock a Secret Service"
        fix += "; check PYTHON_KEYRING_BACKEND"
    elif error is not None:
        message = f"the keyring is unreachable ({backend}: {type(error).__name__}: {error})"
        fix = "`python -m keyring diagnose` shows the backend in use"
    elif backend.startswith("keyrings.alt.file"):
        fix = "use the OS keychain / a Secret Service; unset PYTHON_KEYRING_BACKEND"
        return Check("WARN", f"{backend} keeps secrets in a plain file", fix)
    else:
        return Check("OK", f"{backend} answers")
    if ctx.profile.auth.require_keys == "never":
        return Check("WARN", message + "; this profile requires no API keys", fix)
    return Check("FAIL", message + "; API keys cannot be created or verified", fix)


def check_disk(ctx: Context) -> Check:
    from huggingface_hub import constants

    parts, status, fix = [], "OK", ""
    for label, path in (("HF cache", Path(constants.HF_HUB_CACHE)), ("mlx-serve home", home())):
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        parts.append(f"{label} {path} ({free / GiB:.1f} GiB free)")
        if not os.access(existing, os.W_OK):
            status, fix = "FAIL", f"make {existing} writable, or set HF_HUB_CACHE / MLX_SERVE_HOME"
        elif free < 10 * GiB and status != "FAIL":
            status = "FAIL" if free < 2 * GiB else "WARN"
            fix = f"free space on {path}'s disk or move it (HF_HUB_CACHE / MLX_SERVE_HOME; then reinstall the service)"
    return Check(status, "; ".join(parts), fix)


def check_service(ctx: Context) -> Check:
    try:
        manager = svc.get_manager(ctx.manager)
    except ServiceError as exc:
        return Check("FAIL", str(exc), "use --manager launchd or --manager systemd")
    installed = manager.installed()
    reinstall = "mlx-serve service install"
    if installed is None:
        return Check("WARN", f"not installed ({manager.name}): nothing starts the daemon at login", reinstall)
    if installed.program and not Path(installed.program).exists():
        return Check("FAIL", f"{manager.path} runs {installed.program}, which no longer exists", reinstall)
    drain = ctx.profile.server.drain_timeout
    if installed.stop_timeout is not None and installed.stop_timeout <= drain:
        msg = f"stop timeout {installed.stop_timeout:.0f}s is not above drain_timeout {drain:.0f}s"
        return Check("WARN", msg, reinstall)
    try:
        view = manager.query()
    except ServiceError as exc:
        return Check(
            "WARN", f"installed, but {manager.name} cannot be asked: {exc}", "run it in your session"
        )
    if not view.running:
        msg = f"installed but not running ({view.state}, last exit {view.last_exit or '-'})"
        return Check("FAIL", msg, "mlx-serve service start; then mlx-serve service logs")
    return Check("OK", f"{manager.name}: running, pid {view.pid or '?'}")


def check_health(ctx: Context) -> Check:
    health = ctx.probe()
    if not health.reachable:
        return Check("WARN", f"no daemon answers at {health.url}", "mlx-serve service start (or: serve)")
    if not health.ours or not health.body:
        return Check("FAIL", f"{health.url} is not mlx-serve ({health.error})", "see the port check")
    ready = ctx.probe("/ready")
    body, version = ready.body or {}, health.body.get("version")
    if body.get("ready"):
        models = len(body.get("models", []))
        return Check("OK", f"mlx-serve {version} at {health.url} is ready ({models} models)")
    problems = "; ".join(body.get("problems", [])) or ready.error or "not ready"
    errors = tuple(health.body.get("profile", {}).get("errors", []))
    msg = f"mlx-serve {version} at {health.url} is up but not ready: {problems}"
    return Check("WARN", msg, "mlx-serve service logs", errors)


CHECKS = (check_python, check_mlx, check_profile, check_metal, check_port)
CHECKS += (check_keyring, check_disk, check_service, check_health)


def run_checks(ctx: Context) -> list[Check]:
    results = []
    for check in CHECKS:
        try:
            result = check(ctx)
        except Exception as exc:  # a broken check must not hide the others
            result = Check("FAIL", f"check crashed: {type(exc).__name__}: {exc}", "please report this")
        results.append(replace(result, name=check.__name__.removeprefix("check_")))
    return results
