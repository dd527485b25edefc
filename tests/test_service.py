"""The service: LaunchAgent plist and systemd unit (linted by plistutil / systemd-analyze), the exact
launchctl / systemctl command sequences of the real CLI, `doctor`, log rotation, and the process
behaviour launchd relies on (exit 0 after a SIGTERM drain, non-zero on a fatal start error, no fork).

There is no launchd here: the CLI runs against a fake `launchctl` (and `systemctl`) first on PATH
that records its argv and keeps just enough state (loaded or not) to answer `print` / `show` the way
the real tools do. That is the only stand-in. On macOS, MLX_SERVE_TEST_LAUNCHD=1 runs the same
flow against the real launchctl.
"""

from __future__ import annotations

import json
import logging
import os
import plistlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import mlx_serve_test_harness as harness
from mlx_serve.daemon.cli.checks import wired_verdict
from mlx_serve.launchd import logrotate
from mlx_serve.launchd.plist import LABEL, REQUIRED_KEYS
from mlx_serve.launchd.systemd import read_installed_unit

UNIT = "mlx-serve.service"
FAKE_TOOL = r'''#!{python}
"""Fake {name}: append argv to $FAKE_LOG; keep loaded/active flags in $FAKE_STATE."""
import json, os, pathlib, plistlib, sys

name, args = pathlib.Path(sys.argv[0]).name, sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps([name, *args]) + "\n")
state = pathlib.Path(os.environ["FAKE_STATE"])
state.mkdir(exist_ok=True)
loaded, active, enabled = state / "loaded", state / "active", state / "enabled"


def fail(code, message):
    print(message, file=sys.stderr)
    sys.exit(code)


if name == "launchctl":
    verb = args[0] if args else ""
    if verb == "bootstrap":
        plistlib.loads(pathlib.Path(args[2]).read_bytes())  # launchd rejects a broken plist
        if loaded.exists():
            fail(5, "Bootstrap failed: 5: Input/output error")
        loaded.write_text(args[2])
    elif verb == "bootout":
        if not loaded.exists():
            fail(3, "Boot-out failed: 3: No such process")
        loaded.unlink()
    elif verb in ("print", "kickstart"):
        if not loaded.exists():
            fail(113, "Could not find service in domain for port")
        if verb == "print":
            print(args[1] + " = {\n\tactive count = 1\n\tstate = running\n\tpid = 4242\n"
                  "\tlast exit code = (never exited)\n\tendpoints = {\n\t\tstate = active\n\t}\n}")
    elif verb != "enable":
        fail(64, "fake launchctl: unsupported subcommand " + verb)
else:
    if args[:1] != ["--user"]:
        fail(1, "fake systemctl: expected --user")
    verb, rest = args[1], args[2:]
    unit_file = pathlib.Path(os.environ["HOME"], ".config/systemd/user/mlx-serve.service")
    if verb in ("start", "restart", "enable") and not unit_file.exists():
        fail(5, "Unit mlx-serve.service not found.")
    if verb == "enable":
        enabled.touch()
    if verb == "disable":
        enabled.unlink(missing_ok=True)
    if verb in ("start", "restart") or (verb == "enable" and "--now" in rest):
        active.touch()
    if verb == "stop" or (verb == "disable" and "--now" in rest):
        active.unlink(missing_ok=True)
    if verb == "show":
        up = active.exists()
        print("LoadState=" + ("loaded" if unit_file.exists() else "not-found"))
        print("ActiveState=" + ("active" if up else "inactive"))
        print("SubState=" + ("running" if up else "dead"))
        print("MainPID=" + ("4242" if up else "0"))
        print("ExecMainStatus=0")
        print("UnitFileState=" + ("enabled" if enabled.exists() else "disabled"))
    elif verb not in ("daemon-reload", "enable", "disable", "start", "stop", "restart"):
        fail(64, "fake systemctl: unsupported " + verb)
'''


class ServiceEnv:
    """HOME in a tmp dir, fake launchctl/systemctl first on PATH, the real CLI as a subprocess."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.mlx_home = self.home / ".mlx-serve"
        self.calls_path = root / "calls.jsonl"
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        for name in ("launchctl", "systemctl"):
            tool = bin_dir / name
            tool.write_text(FAKE_TOOL.replace("{python}", sys.executable).replace("{name}", name))
            tool.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MLX_SERVE_"))}
        self.env.update(
            HOME=str(self.home),
            MLX_SERVE_HOME=str(self.mlx_home),
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            FAKE_LOG=str(self.calls_path),
            FAKE_STATE=str(root / "state"),
        )
        self.home.mkdir()
        self.plist = self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        self.unit = self.home / ".config" / "systemd" / "user" / UNIT

    def profile(self, text: str = "", name: str = "config.toml") -> Path:
        path = self.mlx_home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mlx_serve.daemon", *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self.cli(*args)
        assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def calls(self) -> list[list[str]]:
        """The commands recorded since the last call (and forget them)."""
        if not self.calls_path.exists():
            return []
        lines = self.calls_path.read_text().splitlines()
        self.calls_path.unlink()
        return [json.loads(line) for line in lines]


@pytest.fixture
def senv(tmp_path: Path) -> ServiceEnv:
    return ServiceEnv(tmp_path)


def lint_plist(path: Path) -> dict:
    """plistlib round trip plus Debian's plistutil (libimobiledevice) conversion both ways."""
    raw = path.read_bytes()
    data = plistlib.loads(raw)
    assert plistlib.loads(plistlib.dumps(data)) == data
    if shutil.which("plistutil") is None:
        pytest.skip("plistutil missing: apt-get install libplist-utils (run by .ci/system-deps)")
    binary = path.with_suffix(".bin")
    for fmt, src, out in (("bin", path, binary), ("xml", binary, path.with_suffix(".xml"))):
        proc = subprocess.run(
            ["plistutil", "-i", str(src), "-o", str(out), "-f", fmt], capture_output=True, text=True
        )
        # plistutil 2.2 exits 0 even when it cannot convert: judge by stderr and the output file
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
        assert plistlib.loads(out.read_bytes()) == data
    return data


def test_launchagent_plist_is_valid_and_complete(senv: ServiceEnv) -> None:
    profile = senv.profile("[server]\ndrain_timeout = 45\n")
    senv.ok("service", "install", "--manager", "launchd", "--profile", str(profile))
    plist = lint_plist(senv.plist)

    assert [key for key in REQUIRED_KEYS if key not in plist] == []
    assert plist["Label"] == LABEL
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] == 10
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] > 45  # launchd must never SIGKILL the daemon's own drain
    program = plist["ProgramArguments"]
    assert program[1:] == ["-m", "mlx_serve.daemon", "serve", "--profile", str(profile)]
    env = plist["EnvironmentVariables"]
    paths = [program[0], program[-1], plist["WorkingDirectory"], plist["StandardOutPath"]]
    paths += [plist["StandardErrorPath"], env["MLX_SERVE_HOME"], *env["PATH"].split(":")]
    assert [p for p in paths if not os.path.isabs(p)] == []
    assert os.access(program[0], os.X_OK) and Path(program[-1]).is_file()
    assert Path(plist["StandardOutPath"]).parent == senv.mlx_home / "logs"
    assert Path(plist["StandardOutPath"]).parent.is_dir()  # launchd does not create it
    assert env["MLX_SERVE_HOME"] == str(senv.mlx_home)
    path_dirs = env["PATH"].split(":")
    assert path_dirs[0] == str(Path(program[0]).parent)
    assert {"/usr/bin", "/bin", "/usr/sbin", "/sbin", "/opt/homebrew/bin"} <= set(path_dirs)
    # the interpreter is the installed environment's: it can import the daemon as launchd runs it
    check = subprocess.run(
        [program[0], "-c", "import mlx_serve.daemon.server"], env={"PATH": env["PATH"]}, capture_output=True
    )
    assert check.returncode == 0, check.stderr


def test_launchd_command_sequences(senv: ServiceEnv) -> None:
    target, domain = f"gui/{os.getuid()}/{LABEL}", f"gui/{os.getuid()}"
    launchd = ("--manager", "launchd")
    profile = senv.profile("[server]\ndrain_timeout = 5\n")
    printed, bootout = ["launchctl", "print", target], ["launchctl", "bootout", target]
    load = [["launchctl", "enable", target], ["launchctl", "bootstrap", domain, str(senv.plist)]]

    senv.ok("service", "install", *launchd, "--profile", str(profile))
    assert senv.calls() == [printed, *load]
    assert plistlib.loads(senv.plist.read_bytes())["ExitTimeOut"] == 15

    profile.write_text("[server]\ndrain_timeout = 50\n")  # reinstall: file updated, job reloaded
    senv.ok("service", "install", *launchd, "--profile", str(profile))
    assert senv.calls() == [printed, bootout, printed, *load]
    assert plistlib.loads(senv.plist.read_bytes())["ExitTimeOut"] == 60

    senv.ok("service", "restart", *launchd)
    assert senv.calls() == [printed, ["launchctl", "kickstart", "-k", target]]
    senv.ok("service", "stop", *launchd)
    assert senv.calls() == [printed, bootout]
    senv.ok("service", "start", *launchd)  # not loaded after stop: bootstrap again
    assert senv.calls() == [printed, *load]

    status = senv.cli("service", "status", *launchd)
    assert status.returncode == 3  # launchd says running (pid 4242), but no daemon answers /health
    assert "running" in status.stdout and "4242" in status.stdout and "no mlx-serve daemon" in status.stdout

    senv.ok("service", "uninstall", *launchd)
    assert senv.calls()[-2:] == [printed, bootout] and not senv.plist.exists()
    senv.ok("service", "uninstall", *launchd)  # idempotent
    assert senv.calls() == [printed]
    failed = senv.cli("service", "restart", *launchd)
    assert failed.returncode == 1 and "not installed" in failed.stderr and senv.calls() == []


def test_systemd_command_sequences(senv: ServiceEnv) -> None:
    systemd = ("--manager", "systemd")
    profile = senv.profile()
    show = ["systemctl", "--user", "show", UNIT, "--property=" + ",".join(
        ("LoadState", "ActiveState", "SubState", "MainPID", "ExecMainStatus", "UnitFileState"))]  # fmt: skip
    reload_, enable = (
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", UNIT],
    )

    senv.ok("service", "install", *systemd, "--profile", str(profile))
    assert senv.calls() == [show, reload_, enable]
    assert senv.unit.is_file()
    senv.ok("service", "install", *systemd, "--profile", str(profile))
    assert senv.calls() == [show, reload_, enable, ["systemctl", "--user", "restart", UNIT]]
    for action in ("restart", "stop", "start"):
        senv.ok("service", action, *systemd)
        assert senv.calls() == [["systemctl", "--user", action, UNIT]]
    senv.ok("service", "uninstall", *systemd)
    assert senv.calls() == [show, ["systemctl", "--user", "disable", "--now", UNIT], reload_]
    assert not senv.unit.exists()


def test_systemd_unit_passes_systemd_analyze(senv: ServiceEnv) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing: apt-get install systemd (run by .ci/system-deps)")
    # a path that needs quoting and %-escaping in a unit file
    profile = senv.profile("[server]\ndrain_timeout = 33\n", name="my profiles/100% real.toml")
    senv.ok("service", "install", "--manager", "systemd", "--profile", str(profile))
    proc = subprocess.run(["systemd-analyze", "verify", str(senv.unit)], capture_output=True, text=True)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr

    text = senv.unit.read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z]\w+=", line))
    assert settings["Restart"] == "on-failure" and settings["KillSignal"] == "SIGTERM"
    assert int(settings["TimeoutStopSec"]) > 33
    assert settings["StandardOutput"] == f"append:{senv.mlx_home}/logs/daemon.out.log"
    assert f'Environment="MLX_SERVE_HOME={senv.mlx_home}"' in text
    installed = read_installed_unit(senv.unit)
    assert installed is not None and installed.profile == profile and installed.home == senv.mlx_home
    assert installed.program and os.access(installed.program, os.X_OK)


@pytest.mark.parametrize("manager", ["launchd", "systemd"])
def test_dry_run_prints_file_and_commands_and_runs_nothing(senv: ServiceEnv, manager: str) -> None:
    profile = senv.profile()
    out = senv.ok("service", "install", "--manager", manager, "--profile", str(profile), "--dry-run").stdout
    path = senv.plist if manager == "launchd" else senv.unit
    rendered = out.split(f"# {path}\n", 1)[1].split("# commands\n", 1)
    if manager == "launchd":
        assert plistlib.loads(rendered[0].encode())["ProgramArguments"][-1] == str(profile)
        assert f"launchctl bootstrap gui/{os.getuid()} {path}" in rendered[1]
        assert "launchctl bootout" in rendered[1] and "only if loaded" in rendered[1]
    else:
        assert "Restart=on-failure" in rendered[0]
        assert f"systemctl --user enable --now {UNIT}" in rendered[1]
    for args in (("uninstall",), ("restart",), ("stop",)):
        assert senv.ok("service", *args, "--manager", manager, "--dry-run").stdout.strip()
    assert senv.calls() == [] and not path.exists() and not (senv.mlx_home / "logs").exists()


@pytest.mark.parametrize("manager", ["launchd", "systemd"])
def test_install_with_no_profile_writes_the_starter_and_serves_it(senv: ServiceEnv, manager: str) -> None:
    """A new user's second command after `make serve` (which runs the embedded default): never a
    dead end. The starter profile is written where the daemon looks, and the service serves it."""
    default = senv.home / ".mlx-serve" / "config.toml"
    dry = senv.ok("service", "install", "--manager", manager, "--dry-run").stdout
    assert f"would write the starter profile to {default}" in dry and not default.exists()
    out = senv.ok("service", "install", "--manager", manager).stdout
    assert "wrote the starter profile there" in out and default.is_file()
    assert senv.ok("config", "validate", str(default)).returncode == 0
    path = senv.plist if manager == "launchd" else senv.unit
    assert str(default) in path.read_text()
    edited = default.read_text() + "# mine\n"
    default.write_text(edited)
    senv.ok("service", "install", "--manager", manager)  # a second install keeps the user's file
    assert default.read_text() == edited


def test_install_with_a_named_missing_profile_is_refused(senv: ServiceEnv) -> None:
    proc = senv.cli("service", "install", "--manager", "systemd", "--profile", str(senv.home / "typo.toml"))
    assert proc.returncode == 1 and "does not exist" in proc.stderr and not senv.unit.exists()


def test_service_status_sees_the_real_daemon_and_logs_show_files(senv: ServiceEnv) -> None:
    port = harness.free_port()
    profile = senv.profile(f"[server]\nport = {port}\n")
    senv.ok("service", "install", "--manager", "launchd", "--profile", str(profile))
    with harness.Daemon(profile, senv.mlx_home, port=port):
        status = senv.cli("service", "status", "--manager", "launchd")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"health:    ok at http://127.0.0.1:{port}" in status.stdout

    (senv.mlx_home / "logs" / "mlx-serve.log").write_text("one\ntwo\nthree\n")
    logs = senv.ok("service", "logs", "--manager", "launchd", "-n", "2").stdout
    assert "two\nthree" in logs and "one" not in logs


# ---- doctor -----------------------------------------------------------------------------------------
def doctor(senv: ServiceEnv, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    senv.env.update(env)
    return senv.cli("doctor", *args, timeout=120)


def line(output: str, name: str) -> str:
    return next(ln for ln in output.splitlines() if re.match(rf"^\w+\s+{name}\s", ln))


def test_doctor_healthy_setup_exits_zero(senv: ServiceEnv, start_daemon) -> None:
    daemon = start_daemon({})
    # keyrings.alt's file backend: the healthy case needs a backend that answers on any machine
    # (CI has no unlocked Secret Service). doctor reports it as WARN (plain file), which is not a failure.
    proc = doctor(senv, "--profile", str(daemon.profile), "--port", str(daemon.port),
                  PYTHON_KEYRING_BACKEND="keyrings.alt.file.PlaintextKeyring")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert line(proc.stdout, "port").startswith("OK") and "held by the mlx-serve daemon" in proc.stdout
    assert line(proc.stdout, "health").startswith("OK") and "is ready" in proc.stdout
    for name in ("python", "mlx", "profile", "disk"):
        assert line(proc.stdout, name).startswith("OK"), proc.stdout
    if sys.platform != "darwin":
        assert line(proc.stdout, "metal").startswith("SKIP") and "not macOS" in proc.stdout


def test_doctor_port_taken_by_another_program(senv: ServiceEnv) -> None:
    profile = senv.profile()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = doctor(senv, "--profile", str(profile), "--port", str(port))
    assert proc.returncode == 1
    assert line(proc.stdout, "port").startswith("FAIL") and "used by another program" in proc.stdout
    assert f"lsof -nP -iTCP:{port}" in proc.stdout


def test_doctor_bad_profile(senv: ServiceEnv) -> None:
    profile = senv.profile("[server]\nport = 8080\nbogus = 1\n")
    proc = doctor(senv, "--profile", str(profile), "--port", str(harness.free_port()))
    assert proc.returncode == 1
    assert line(proc.stdout, "profile").startswith("FAIL")
    assert f"{profile}:3: server.bogus: unknown key" in proc.stdout


def test_doctor_unreachable_keyring(senv: ServiceEnv) -> None:
    profile = senv.profile()
    proc = doctor(senv, "--profile", str(profile), "--port", str(harness.free_port()),
                  PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")  # fmt: skip
    assert proc.returncode == 1
    assert line(proc.stdout, "keyring").startswith("FAIL") and "no usable keyring backend" in proc.stdout


def test_wired_memory_verdict() -> None:
    gib = 1 << 30
    assert wired_verdict(8 * gib, {"big": 9 * gib, "small": gib}, set()).status == "FAIL"
    near = wired_verdict(8 * gib, {"a": int(7.5 * gib)}, set())
    assert near.status == "WARN" and "iogpu.wired_limit_mb=" in near.fix
    assert wired_verdict(8 * gib, {"a": 5 * gib, "b": 5 * gib}, {"a", "b"}).status == "WARN"
    ok = wired_verdict(8 * gib, {"a": 2 * gib, "hub": None}, set())
    assert ok.status == "OK" and "1 not downloaded" in ok.message


# ---- log rotation -------------------------------------------------------------------------------
def test_std_files_rotate_in_place_and_handler_rotates(tmp_path: Path) -> None:
    err = tmp_path / logrotate.STDERR_NAME
    with open(err, "ab") as writer:  # like launchd / systemd: kept open, O_APPEND
        writer.write(b"x" * 2000)
        writer.flush()
        assert logrotate.rotate_std_files(tmp_path, max_bytes=1000, backups=2) == [err]
        writer.write(b"after\n")
        writer.flush()
    assert err.read_bytes() == b"after\n"  # truncated in place, the writer continues at the start
    assert (tmp_path / f"{err.name}.1").stat().st_size == 2000
    assert logrotate.rotate_std_files(tmp_path, max_bytes=1000, backups=2) == []

    handler = logrotate.DaemonLogHandler(tmp_path, max_bytes=500, backups=2)
    logger = logging.getLogger("test-rotation")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    for i in range(100):
        logger.info("line %03d %s", i, "y" * 40)
    logger.removeHandler(handler)
    handler.close()
    names = sorted(p.name for p in tmp_path.glob(f"{logrotate.LOG_NAME}*"))
    assert names == [logrotate.LOG_NAME, f"{logrotate.LOG_NAME}.1", f"{logrotate.LOG_NAME}.2"]
    assert all(p.stat().st_size <= 500 for p in tmp_path.glob(f"{logrotate.LOG_NAME}*"))


def test_setup_file_logging_under_a_supervisor(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    err = logs / logrotate.STDERR_NAME
    err.write_bytes(b"old\n" * 400)  # over max_bytes: rotated when the daemon starts
    script = (
        "import logging\n"
        "from mlx_serve.launchd.logrotate import setup_file_logging\n"
        "logging.basicConfig(level='INFO', format='%(levelname)s %(message)s')\n"
        f"setup_file_logging({str(logs)!r}, max_bytes=1000, backups=2)\n"
        "logging.getLogger('t').info('info line')\n"
        "logging.getLogger('t').warning('warning line')\n"
    )
    with open(err, "ab") as stderr:  # as launchd runs it: stderr is daemon.err.log, O_APPEND
        subprocess.run([sys.executable, "-c", script], stderr=stderr, check=True, timeout=60)
    main = (logs / logrotate.LOG_NAME).read_text()
    assert "info line" in main and "warning line" in main
    assert err.read_text() == "WARNING warning line\n"  # old content rotated away, info not doubled
    assert (logs / f"{logrotate.STDERR_NAME}.1").read_bytes() == b"old\n" * 400
    # in a terminal (stderr is not the service file) stderr keeps every line
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "INFO info line" in plain.stderr


# ---- process behaviour launchd relies on (the real daemon) --------------------------------------
def test_sigterm_drains_in_flight_stream_then_exits_zero(start_daemon, tiny_gguf: Path) -> None:
    # The tiny model never emits EOS, so a finished stream has exactly max_tokens chunks.
    model = {"source": str(tiny_gguf), "engine": "llama_cpp", "ttl": "forever", "preload": True}
    daemon = start_daemon({"tiny": model}, wait_ready=True, server={"drain_timeout": 120})
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        daemon.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    chunks, done = [], False
    with urllib.request.urlopen(request, timeout=120) as stream:
        for raw in stream:
            if raw.startswith(b"data: {"):
                chunks.append(json.loads(raw[6:]))
                if len(chunks) == 1:  # mid-generation: stop the daemon as launchd would
                    daemon.proc.send_signal(signal.SIGTERM)
                    with pytest.raises(OSError):  # it stops accepting at once ...
                        _wait_refused(daemon.port)
            done = done or raw.strip() == b"data: [DONE]"
    # ... but the stream in flight runs to its end
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    assert done and finish[-1] == "length"  # it ran to max_tokens: not cut short by the shutdown
    assert chunks[-1]["usage"]["completion_tokens"] == 100
    assert daemon.proc.wait(60) == 0
    assert "draining" in daemon.logs()


def _wait_refused(port: int, timeout: float = 10) -> None:
    """Connect until the listener is gone (then raise ConnectionRefusedError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        time.sleep(0.05)


def test_port_taken_is_a_fatal_start_error(tmp_path: Path) -> None:
    profile = tmp_path / "config.toml"
    profile.write_text("")
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = {**os.environ, "MLX_SERVE_HOME": str(tmp_path)}
        cmd = [
            sys.executable,
            "-m",
            "mlx_serve.daemon",
            "serve",
            "--profile",
            str(profile),
            "--port",
            str(port),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "cannot start" in proc.stderr


def test_daemon_does_not_fork(start_daemon) -> None:
    daemon = start_daemon({})
    match = re.search(r"mlx-serve (\d+) listening on", daemon.logs())
    assert match and int(match.group(1)) == daemon.proc.pid
    if sys.platform.startswith("linux"):  # the started PID itself holds the listening socket
        port_hex = f":{daemon.port:04X}"
        inodes = {
            row.split()[9]
            for row in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if row.split()[1].endswith(port_hex) and row.split()[3] == "0A"  # 0A = LISTEN
        }
        fds = {os.readlink(fd) for fd in Path(f"/proc/{daemon.proc.pid}/fd").iterdir()}
        assert {f"socket:[{inode}]" for inode in inodes} & fds
    assert daemon.stop() == 0
    with pytest.raises(OSError):  # nothing left behind serving the port
        socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()


# ---- the real launchd (macOS only, opt-in) ------------------------------------------------------
@pytest.mark.skipif(
    sys.platform != "darwin" or os.environ.get("MLX_SERVE_TEST_LAUNCHD") != "1",
    reason="real launchctl: macOS with MLX_SERVE_TEST_LAUNCHD=1 only",
)
def test_real_launchd_install_restart_uninstall(tmp_path: Path) -> None:
    if (
        subprocess.run(["launchctl", "print", f"gui/{os.getuid()}/{LABEL}"], capture_output=True).returncode
        == 0
    ):
        pytest.skip(f"{LABEL} is already loaded for this user; not touching a real installation")
    senv = ServiceEnv(tmp_path)
    senv.env["PATH"] = os.environ["PATH"]  # the real launchctl
    port = harness.free_port()
    profile = senv.profile(f"[server]\nport = {port}\ndrain_timeout = 5\n")
    url = f"http://127.0.0.1:{port}/health"

    def health_pid(timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = senv.cli("service", "status", "--manager", "launchd")
            pid = re.search(r"pid:\s+(\d+)", status.stdout)
            if status.returncode == 0 and pid:
                urllib.request.urlopen(url, timeout=5).close()
                return int(pid.group(1))
            time.sleep(0.5)
        raise AssertionError(f"service not healthy:\n{status.stdout}{status.stderr}")

    try:
        senv.ok("service", "install", "--manager", "launchd", "--profile", str(profile))
        first = health_pid()
        senv.ok("service", "install", "--manager", "launchd", "--profile", str(profile))  # reinstall
        second = health_pid()
        senv.ok("service", "restart", "--manager", "launchd")
        third = health_pid()
        assert len({first, second, third}) == 3
    finally:
        senv.cli("service", "uninstall", "--manager", "launchd")
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
