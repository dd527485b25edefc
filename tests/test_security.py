"""Security against the real daemon: API keys in a real keyring (keyrings.alt's file backend chosen
explicitly, and Secret Service through gnome-keyring under dbus-run-session), the official
clients of each dialect, Host allow-list, CORS, size limits, idle sockets, a hostile chat
template in a GGUF, and finally a scan of every daemon log for keys, digests and prompts."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import anthropic
import gguf
import httpx
import ollama
import openai
import pytest

import mlx_serve_test_models as test_models  # loaded by conftest.py
from mlx_serve_test_harness import Daemon, profile_text

SECRETS: list[str] = []  # every key secret the tests saw: none may appear in a log
PROMPTS: list[str] = []  # every prompt text sent: none may appear in a log
DAEMONS: list[Daemon] = []
# A test backend, chosen explicitly through PYTHON_KEYRING_BACKEND; never a product fallback.
FILE_BACKEND = "keyrings.alt.file.PlaintextKeyring"
CORS_ORIGIN = "http://app.example.test:3000"
KEYRING_SERVICE = "mlx-serve-test"


def prompt(tag: str) -> str:
    text = f"confidential {tag} prompt {uuid.uuid4().hex}"
    PROMPTS.append(text)
    return text


def tiny(path: Path, **extra) -> dict:
    return {"source": str(path), "engine": "llama_cpp", "ttl": "forever", **extra}


def wait_for(predicate, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory):
    """Module-scoped daemons: launch(models, env=..., auth=..., server=...)."""

    def start(models: dict, env: dict | None = None, **sections) -> Daemon:
        home = tmp_path_factory.mktemp("security-home")
        profile = home / "config.toml"
        profile.write_text(profile_text(models, **sections))
        daemon = Daemon(profile, home, env=env)
        DAEMONS.append(daemon)
        return daemon.start()

    yield start
    for daemon in DAEMONS:
        daemon.stop()


def file_keyring(root: Path) -> dict[str, str]:
    return {
        "PYTHON_KEYRING_BACKEND": FILE_BACKEND,
        "XDG_DATA_HOME": str(root / "data"),
        "XDG_CONFIG_HOME": str(root / "config"),
    }


def keyring_file(env: dict[str, str]) -> Path:
    return Path(env["XDG_DATA_HOME"]) / "python_keyring" / "keyring_pass.cfg"


def keys_cli(daemon: Daemon, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlx_serve.daemon", "keys", *args]
    cmd += ["--profile", str(daemon.profile), "--url", daemon.url]
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def create_key(daemon: Daemon, env: dict, name: str, *options: str, action: str = "create") -> str:
    result = keys_cli(daemon, env, action, name, *options)
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert re.fullmatch(r"msk-[A-Za-z0-9_\-]{43}", secret), result.stdout
    SECRETS.append(secret)
    assert "has the change" in result.stderr, result.stderr  # the running daemon was told
    return secret


def oai(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def chat(client: openai.OpenAI, model: str = "tiny", tag: str = "chat") -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt(tag)}], max_tokens=2, temperature=0
    )
    return reply.model


def auth_failures(daemon: Daemon) -> dict[str, float]:
    text = httpx.get(f"{daemon.url}/metrics", timeout=30).text
    found = re.findall(r'^mlx_serve_auth_failures_total\{reason="([^"]+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


# ---- keys under require_keys = "always" with a file keyring -------------------------------------


@pytest.fixture(scope="module")
def keyring_env(tmp_path_factory) -> dict[str, str]:
    return file_keyring(tmp_path_factory.mktemp("keyring"))


@pytest.fixture(scope="module")
def keyed(launch, keyring_env, tiny_gguf) -> Daemon:
    models = {"tiny": tiny(tiny_gguf, aliases=["gpt-4o*", "claude-*", "tiny-chat"]), "other": tiny(tiny_gguf)}
    auth = {"require_keys": "always", "keyring_service": KEYRING_SERVICE, "refresh_interval": 5.0}
    return launch(models, env=keyring_env, auth=auth)


def test_key_lifecycle_with_each_official_client(keyed: Daemon, keyring_env) -> None:
    missing = httpx.get(f"{keyed.url}/v1/models", timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert "mlx-serve keys create" in missing.json()["error"]["message"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        oai(keyed.url, "msk-" + "x" * 43).models.list()

    secret = create_key(keyed, keyring_env, "life")
    assert chat(oai(keyed.url, secret)) == "tiny"
    claude = anthropic.Anthropic(base_url=keyed.url, api_key=secret, max_retries=0)
    message = claude.messages.create(
        model="claude-3-5-haiku", max_tokens=2, messages=[{"role": "user", "content": prompt("anthropic")}]
    )
    assert message.content
    olla = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {secret}"})
    reply = olla.chat(
        model="tiny", messages=[{"role": "user", "content": prompt("ollama")}], options={"num_predict": 2}
    )
    assert reply.message.role == "assistant"
    azure_style = httpx.get(f"{keyed.url}/v1/models", headers={"api-key": secret}, timeout=30)
    assert azure_style.status_code == 200

    listing = keys_cli(keyed, keyring_env, "list")
    assert listing.returncode == 0 and "life" in listing.stdout
    assert secret not in listing.stdout + listing.stderr
    assert hashlib.sha256(secret.encode()).hexdigest() not in listing.stdout
    row = next(line for line in listing.stdout.splitlines() if line.startswith("life"))
    assert not row.rstrip().endswith(" -"), "last used should be known to the running daemon"
    stored = keyring_file(keyring_env).read_text()
    assert secret not in stored  # only the digest is stored

    rotated = create_key(keyed, keyring_env, "life", action="rotate")
    with pytest.raises(openai.AuthenticationError):
        oai(keyed.url, secret).models.list()
    assert oai(keyed.url, rotated).models.list().data

    revoked = keys_cli(keyed, keyring_env, "revoke", "life")
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError):
        oai(keyed.url, rotated).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=keyed.url, api_key=rotated, max_retries=0).messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {rotated}"}).list()
    assert err.value.status_code == 401
    counts = auth_failures(keyed)
    assert counts.get("missing", 0) >= 1 and counts.get("invalid", 0) >= 4


def test_scopes_give_403_in_each_dialects_shape(keyed: Daemon, keyring_env) -> None:
    openai_only = create_key(keyed, keyring_env, "openai-gpt", "--models", "gpt-4o*", "--apis", "openai")
    client = oai(keyed.url, openai_only)
    assert chat(client, "gpt-4o-mini") == "tiny"  # the requested name matches the glob
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'other'"):
        chat(client, "other")
    with pytest.raises(openai.PermissionDeniedError, match="may not use model"):
        client.models.retrieve("other")
    with pytest.raises(anthropic.PermissionDeniedError, match="anthropic API"):
        anthropic.Anthropic(base_url=keyed.url, api_key=openai_only, max_retries=0).messages.create(
            model="gpt-4o", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {openai_only}"}).list()
    assert err.value.status_code == 403 and "ollama API" in str(err.value)

    by_id = create_key(keyed, keyring_env, "tiny-anthropic", "--models", "tiny", "--apis", "anthropic")
    claude = anthropic.Anthropic(base_url=keyed.url, api_key=by_id, max_retries=0)
    text = prompt("scoped")
    ok = claude.messages.create(model="claude-x", max_tokens=2, messages=[{"role": "user", "content": text}])
    assert ok.content  # claude-x resolves to the profile id "tiny", which the glob names
    with pytest.raises(anthropic.PermissionDeniedError):
        claude.messages.create(model="other", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert auth_failures(keyed).get("scope", 0) >= 5


def ollama_names(client: ollama.Client, what: str = "list") -> set[str]:
    listing = client.list() if what == "list" else client.ps()
    return {m.model for m in listing.models}


def test_model_listings_follow_the_keys_model_scope(keyed: Daemon, keyring_env) -> None:
    """A key limited by --models lists only the names it may use, in every dialect's listing."""
    everything = create_key(keyed, keyring_env, "lister-all")
    only_tiny = create_key(keyed, keyring_env, "lister-tiny", "--models", "tiny")
    only_other = create_key(keyed, keyring_env, "lister-other", "--models", "oth*")
    # load both models so /api/ps has something to hide
    for model in ("tiny", "other"):
        assert chat(oai(keyed.url, everything), model, "scope-listing") == model

    assert {m.id for m in oai(keyed.url, everything).models.list()} == {"tiny", "tiny-chat", "other"}
    assert {m.id for m in oai(keyed.url, only_tiny).models.list()} == {"tiny", "tiny-chat"}  # alias of tiny
    assert {m.id for m in oai(keyed.url, only_other).models.list()} == {"other"}
    assert oai(keyed.url, only_tiny).models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'other'") as err:
        oai(keyed.url, only_tiny).models.retrieve("other")
    assert err.value.body["type"] == "permission_error"

    def olla(secret: str) -> ollama.Client:
        return ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {secret}"})

    assert ollama_names(olla(everything)) == {"tiny:latest", "tiny-chat:latest", "other:latest"}
    assert ollama_names(olla(only_tiny)) == {"tiny:latest", "tiny-chat:latest"}
    assert ollama_names(olla(only_other)) == {"other:latest"}
    assert ollama_names(olla(everything), "ps") == {"tiny:latest", "other:latest"}
    assert ollama_names(olla(only_tiny), "ps") == {"tiny:latest"}
    assert ollama_names(olla(only_other), "ps") == {"other:latest"}
    with pytest.raises(ollama.ResponseError) as denied:
        olla(only_tiny).show("other")
    assert denied.value.status_code == 403

    # Anthropic's SDK lists models from the same GET /v1/models.
    claude = anthropic.Anthropic(base_url=keyed.url, api_key=only_other, max_retries=0)
    assert {m.id for m in claude.models.list()} == {"other"}


def test_loopback_without_keys_lists_every_model(launch, keyring_env, tiny_gguf) -> None:
    """Under the default policy a loopback client needs no key, so a scoped key changes nothing."""
    models = {"tiny": tiny(tiny_gguf), "other": tiny(tiny_gguf)}
    daemon = launch(models, env=keyring_env, auth={"keyring_service": KEYRING_SERVICE})
    scoped = create_key(daemon, keyring_env, "loopback-tiny", "--models", "tiny")
    assert {m.id for m in oai(daemon.url, "unused").models.list()} == {"tiny", "other"}
    assert {m.id for m in oai(daemon.url, scoped).models.list()} == {"tiny", "other"}
    assert ollama_names(ollama.Client(host=daemon.url)) == {"tiny:latest", "other:latest"}


def test_rate_limit_answers_429_with_retry_after(keyed: Daemon, keyring_env) -> None:
    client = oai(keyed.url, create_key(keyed, keyring_env, "slow", "--rate", "2"))
    client.models.list()
    client.models.list()
    with pytest.raises(openai.RateLimitError, match="2 requests per minute") as err:
        client.models.list()
    assert 1 <= int(err.value.response.headers["Retry-After"]) <= 30
    assert auth_failures(keyed).get("rate_limited", 0) >= 1


def test_expired_key_is_refused(keyed: Daemon, keyring_env) -> None:
    expires = datetime.now().astimezone() + timedelta(seconds=4)
    client = oai(keyed.url, create_key(keyed, keyring_env, "brief", "--expires", expires.isoformat()))
    assert client.models.list().data
    time.sleep(max(0.0, expires.timestamp() - time.time()) + 0.5)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        client.models.list()


def test_broken_keyring_fails_closed_then_recovers(launch, tmp_path_factory, tiny_gguf) -> None:
    """At runtime: loopback keeps working without a key, key-protected access gets a clear 503,
    and the periodic refresh picks the keyring up again once it is readable."""
    env = file_keyring(tmp_path_factory.mktemp("keyring-runtime"))
    # Tests send traffic to loopback only, so "always" stands in for a remote client's policy.
    auth = {"require_keys": "always", "refresh_interval": 5.0}
    daemon = launch({"tiny": tiny(tiny_gguf)}, env=env, auth=auth)
    base = daemon.url
    secret = create_key(daemon, env, "remote")
    client = oai(base, secret)
    assert client.models.list().data
    with pytest.raises(openai.AuthenticationError):
        oai(base, "msk-wrong").models.list()

    good = keyring_file(env).read_bytes()
    keyring_file(env).write_bytes(b"this is not an ini file\n")
    refreshed = httpx.post(f"{daemon.url}/keys/refresh", timeout=60)
    assert refreshed.status_code == 503 and "keyring backend failed" in refreshed.json()["error"]
    with pytest.raises(
        openai.InternalServerError, match="API keys are unavailable: keyring backend failed"
    ) as err:
        client.models.list()
    assert err.value.status_code == 503 and err.value.response.headers["Retry-After"] == "5"
    assert httpx.get(f"{daemon.url}/health", timeout=30).status_code == 200
    assert auth_failures(daemon).get("keyring_unavailable", 0) >= 1

    keyring_file(env).write_bytes(good)
    wait_for(lambda: httpx.get(f"{base}/v1/models", headers={"x-api-key": secret}).status_code == 200, 20)
    assert "API keys are available again" in daemon.logs()


def test_missing_keyring_at_start(launch, tmp_path_factory, tiny_gguf) -> None:
    env = {
        **file_keyring(tmp_path_factory.mktemp("keyring-none")),
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
    }
    daemon = launch({"tiny": tiny(tiny_gguf)}, env=env, auth={"require_keys": "always"})
    assert httpx.get(f"{daemon.url}/health", timeout=30).json()["status"] == "ok"
    with pytest.raises(openai.InternalServerError, match="API keys are unavailable: no keyring backend"):
        oai(daemon.url, "msk-anything").models.list()
    # The default policy: loopback clients need no key, keyring or not.
    default = launch({"tiny": tiny(tiny_gguf)}, env=env)
    assert chat(oai(default.url, "unused")) == "tiny"
    created = keys_cli(daemon, env, "create", "nope")
    assert created.returncode == 1 and "API keys are unavailable" in created.stderr and not created.stdout
    assert not Path(env["XDG_DATA_HOME"]).exists()  # nothing was written anywhere


@pytest.mark.skipif(sys.platform != "linux", reason="elsewhere the OS keyring is real and always there")
def test_no_plaintext_fallback_when_no_secure_keyring(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHON_KEYRING_BACKEND", "DBUS_SESSION_BUS_ADDRESS")
    }
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "config"))
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    probe = "import keyring; print(type(keyring.get_keyring()).__name__)"
    chosen = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    cmd = [sys.executable, "-m", "mlx_serve.daemon", "keys", "create", "ci", "--service", "mlx-serve-test"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and not result.stdout
    assert "no secure keyring is available" in result.stderr, (chosen.stdout, result.stderr)
    assert not (tmp_path / "data").exists(), f"keyring alone picks {chosen.stdout.strip()}; we must not"


@pytest.fixture
def secret_service(tmp_path: Path):
    """A gnome-keyring Secret Service on a private D-Bus session bus, unlocked with a test password."""
    if sys.platform != "linux" or not (
        shutil.which("dbus-run-session") and shutil.which("gnome-keyring-daemon")
    ):
        pytest.skip("dbus-run-session and gnome-keyring-daemon are needed")
    if "PYTHON_KEYRING_BACKEND" in os.environ:
        pytest.skip("PYTHON_KEYRING_BACKEND is set: the Secret Service would not be chosen")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_RUNTIME_DIR": str(run),
    }
    bus_file = tmp_path / "bus"
    script = (
        "printf %s test-password | gnome-keyring-daemon --unlock --components=secrets >/dev/null 2>&1;"
        ' echo "$DBUS_SESSION_BUS_ADDRESS" > "$BUS_FILE"; exec sleep 900'
    )
    proc = subprocess.Popen(
        ["dbus-run-session", "--", "sh", "-c", script], env={**os.environ, **env, "BUS_FILE": str(bus_file)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: bus_file.exists() and bus_file.read_text().strip(), 30, 0.1)
        yield {**env, "DBUS_SESSION_BUS_ADDRESS": bus_file.read_text().strip()}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_secret_service_keyring_locked_at_runtime(launch, secret_service, tiny_gguf) -> None:
    daemon = launch({"tiny": tiny(tiny_gguf)}, env=secret_service, auth={"require_keys": "always"})
    secret = create_key(daemon, secret_service, "desktop", "--models", "tiny")
    assert chat(oai(daemon.url, secret)) == "tiny"
    assert "SecretService" in daemon.logs()
    lock = "import secretstorage as s; c = s.get_default_collection(s.dbus_init()); c.lock(); print(c.is_locked())"
    locked = subprocess.run(
        [sys.executable, "-c", lock],
        env={**os.environ, **secret_service},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert locked.stdout.strip() == "True", locked.stderr
    refreshed = httpx.post(f"{daemon.url}/keys/refresh", timeout=60)
    assert refreshed.status_code == 503 and "keyring locked" in refreshed.json()["error"]
    with pytest.raises(openai.InternalServerError, match="API keys are unavailable: keyring locked"):
        oai(daemon.url, secret).models.list()
    assert httpx.get(f"{daemon.url}/ready", timeout=30).status_code == 200


def test_network_bind_without_keys_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "config.toml"
    profile.write_text(profile_text({}, auth={"require_keys": "never"}))
    serve = ["serve", "--profile", str(profile), "--host", "0.0.0.0", "--port", "0"]
    cmd = [sys.executable, "-m", "mlx_serve.daemon", *serve]
    result = subprocess.run(
        cmd, env={**os.environ, "MLX_SERVE_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "allow_unauthenticated_network" in result.stderr


# ---- hardening ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hardened(launch, tiny_gguf) -> Daemon:
    limits = {"idle_timeout": 1.0, "max_body_bytes": 65536, "max_header_bytes": 4096}
    server = {"allowed_hosts": ["llm.example.test"], "cors_origins": [CORS_ORIGIN], "limits": limits}
    return launch({"tiny": tiny(tiny_gguf)}, server=server)


def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get_with_hosts(port: int, path: str, *hosts: str) -> tuple[int, dict[str, str], bytes]:
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"Host: {h}\r\n" for h in hosts) + "Connection: close\r\n\r\n"
    return raw_request(port, head.encode())


@pytest.mark.parametrize(
    "hosts, allowed",
    [
        (["localhost"], True), (["localhost:{port}"], True), (["127.0.0.1"], True), (["127.0.0.1:{port}"], True),
        (["[::1]:{port}"], True), (["LOCALHOST:{port}"], True), (["llm.example.test:{port}"], True),
        (["evil.example"], False), (["evil.example:{port}"], False), ([""], False), ([], False),
        (["localhost", "localhost"], False), (["localhost", "evil.example"], False),
        (["localhost.evil.example"], False), (["localhost.evil.example:{port}"], False),
        (["127.0.0.1.nip.io"], False), (["127.0.0.1.nip.io:{port}"], False), (["localhost."], False),
        (["llm.example.test.evil.example"], False), (["localhost:1"], False), (["evil.local:{port}"], False),
    ],
)  # fmt: skip
def test_host_header_allow_list(hardened: Daemon, hosts: list[str], allowed: bool) -> None:
    values = [h.format(port=hardened.port) for h in hosts]
    status, _, body = get_with_hosts(hardened.port, "/v1/models", *values)
    if allowed:
        assert status == 200, body
    else:  # aiohttp's parser itself refuses a missing Host on HTTP/1.1 and duplicate Hosts with 400
        assert status in ((400,) if len(values) != 1 else (403,)), body
    if status == 403:
        assert b'"permission_error"' in body
    if values == ["evil.example"]:
        status, _, body = get_with_hosts(hardened.port, "/api/tags", *values)
        assert status == 403 and body.startswith(b'{"error": "Host')  # Ollama's error shape


def test_host_rejections_are_counted(hardened: Daemon) -> None:
    get_with_hosts(hardened.port, "/health", "evil.example")
    assert auth_failures(hardened).get("host", 0) >= 1


def test_cors_is_closed_except_for_listed_origins(hardened: Daemon) -> None:
    url = f"{hardened.url}/v1/chat/completions"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    preflight["Access-Control-Request-Private-Network"] = "true"
    foreign = httpx.options(url, headers={**preflight, "Origin": "http://evil.example"}, timeout=30)
    assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
    listed = httpx.options(url, headers={**preflight, "Origin": CORS_ORIGIN}, timeout=30)
    assert listed.status_code == 204
    assert listed.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "Origin" in listed.headers["vary"]
    assert "authorization" in listed.headers["access-control-allow-headers"].lower()
    for header in ("access-control-allow-credentials", "access-control-allow-private-network"):
        assert header not in listed.headers
    simple = httpx.get(f"{hardened.url}/v1/models", headers={"Origin": "http://evil.example"}, timeout=30)
    assert simple.status_code == 403 and "access-control-allow-origin" not in simple.headers
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt("cors")}],
        "max_tokens": 2,
        "stream": True,
    }
    with httpx.stream("POST", url, json=body, headers={"Origin": CORS_ORIGIN}, timeout=120) as streamed:
        assert streamed.status_code == 200 and streamed.headers["access-control-allow-origin"] == CORS_ORIGIN
        assert "data: [DONE]" in streamed.read().decode()


def test_oversize_body_and_headers(hardened: Daemon) -> None:
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 70_000}]}
    response = httpx.post(f"{hardened.url}/v1/chat/completions", json=big, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"
    leaked = "msk-" + uuid.uuid4().hex  # aiohttp quotes the start of an oversize line in its error
    SECRETS.append(leaked)
    for extra in (
        f"Authorization: Bearer {leaked}{'a' * 8000}\r\n",
        "".join(f"X-H{i}: 1\r\n" for i in range(200)),
    ):
        head = f"GET /health HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n"
        assert raw_request(hardened.port, head.encode())[0] in (400, 431)


@pytest.mark.parametrize(
    "sent", [b"", b"GET /health HTTP/1.1\r\nHost: localhost\r\n"], ids=["silent", "half-headers"]
)
def test_idle_socket_is_closed(hardened: Daemon, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", hardened.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        assert sock.recv(1024) == b""  # closed by the server, no response
        assert 0.8 <= time.monotonic() - started <= 5.0


# ---- untrusted chat templates -------------------------------------------------------------------

MARKER = Path(tempfile.gettempdir()) / "mlx-serve-template-escaped"
EVIL_TEMPLATE = (
    "{{ cycler.__init__.__globals__.os.popen('touch " + str(MARKER) + "').read() }}"
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
)


def build_evil_gguf(smollm2: Path) -> Path:
    """The tiny model with SmolLM2's tokenizer and a template that tries to run a shell command."""

    def build(out: Path) -> None:
        out.mkdir()
        tokenizer = out / "tokenizer.gguf"
        writer = gguf.GGUFWriter(tokenizer, "llama")
        for key, field in gguf.GGUFReader(smollm2).fields.items():
            if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
                sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), field.types[0], sub_type)
        writer.add_chat_template(EVIL_TEMPLATE)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        test_models.write_llama_gguf(out / "evil.gguf", test_models.tiny_weights(smollm2), tokenizer)
        tokenizer.unlink()

    recipe = {"shape": test_models.TINY, "template": EVIL_TEMPLATE, "source_size": smollm2.stat().st_size}
    return test_models.cached_build("evil-template-gguf", recipe, build) / "evil.gguf"


def test_hostile_chat_template_fails_the_load(launch, smollm2_gguf: Path) -> None:
    MARKER.unlink(missing_ok=True)
    daemon = launch({"evil": tiny(build_evil_gguf(smollm2_gguf))})
    with pytest.raises(openai.InternalServerError, match="chat template tried an unsafe operation") as err:
        chat(oai(daemon.url, "unused"), "evil", "template")
    assert err.value.status_code == 503
    status = {m["id"]: m for m in daemon.get_json("/status")["models"]}["evil"]
    assert status["state"] == "failed" and "unsafe" in status["error"]
    assert not MARKER.exists(), "the template ran a shell command"


# ---- per-connection limits ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(launch, tiny_gguf) -> Daemon:
    limits = {"max_requests_per_connection": 3, "max_headers": 24}
    return launch({"tiny": tiny(tiny_gguf)}, server={"limits": limits})


def port_recording_client(base: str, ports: list[int], timeout: float = 30) -> httpx.Client:
    """A keep-alive client that notes each response's local port (read as its headers arrive:
    the socket is gone once a `Connection: close` response is read)."""

    def record(response: httpx.Response) -> None:
        ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])

    return httpx.Client(base_url=base, timeout=timeout, event_hooks={"response": [record]})


def test_keep_alive_connection_closes_after_its_request_limit(limited: Daemon) -> None:
    ports: list[int] = []
    with port_recording_client(limited.url, ports) as client:
        responses = [client.get("/health") for _ in range(7)]
    assert all(r.status_code == 200 for r in responses)
    closing = [r.headers.get("connection", "").lower() == "close" for r in responses]
    assert closing == [False, False, True, False, False, True, False]
    assert ports[0] == ports[1] == ports[2] != ports[3] == ports[4] == ports[5] != ports[6]
    assert len(set(ports)) == 3


def test_pipelined_requests_past_the_limit_are_not_answered(limited: Daemon) -> None:
    one = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", limited.port), timeout=30) as sock:
        sock.sendall(one * 5)
        data = b""
        while chunk := sock.recv(65536):  # the server closes the connection after the third
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 3
    assert data.lower().count(b"connection: close") == 1


def test_streamed_response_counts_toward_the_limit(limited: Daemon) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt("keepalive")}], "max_tokens": 2}
    ports: list[int] = []
    with port_recording_client(limited.url, ports, timeout=120) as client:
        client.get("/health")
        client.get("/health")
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200 and streamed.headers["connection"].lower() == "close"
            assert "data: [DONE]" in streamed.read().decode()
        client.get("/health")
    assert ports[0] == ports[1] == ports[2] != ports[3]


def test_request_limit_applies_on_reload(launch, tmp_path_factory) -> None:
    daemon = launch({}, server={"limits": {"max_requests_per_connection": 4}})

    def closes_after() -> int:
        with httpx.Client(base_url=daemon.url, timeout=30) as client:
            for count in range(1, 10):
                if client.get("/health").headers.get("connection", "").lower() == "close":
                    return count
        return 0

    assert closes_after() == 4
    daemon.profile.write_text(profile_text({}, server={"limits": {"max_requests_per_connection": 2}}))
    assert wait_for(lambda: closes_after() == 2, 20)


def test_too_many_headers_get_400_and_the_daemon_keeps_serving(limited: Daemon) -> None:
    def get(extra_headers: int) -> int:
        extra = "".join(f"X-Extra-{i}: {i}\r\n" for i in range(extra_headers))
        return raw_request(
            limited.port,
            f"GET /health HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n".encode(),
        )[0]

    assert get(20) == 200  # 22 header lines: within max_headers = 24
    assert get(30) in (400, 431)
    many = {f"X-Extra-{i}": str(i) for i in range(40)}
    assert httpx.get(f"{limited.url}/health", headers=many, timeout=30).status_code in (400, 431)
    assert httpx.get(f"{limited.url}/health", timeout=30).status_code == 200


# ---- the user's home directory never shows --------------------------------------------------------


@pytest.fixture(scope="module")
def home_daemon(tmp_path_factory, tiny_gguf) -> Daemon:
    """A daemon whose HOME holds its profile and its models, one missing, one broken."""
    home = tmp_path_factory.mktemp("user-home")
    (home / "models").mkdir()
    try:
        os.link(tiny_gguf, home / "models" / "tiny.gguf")
    except OSError:
        shutil.copyfile(tiny_gguf, home / "models" / "tiny.gguf")
    broken = home / "models" / "broken-mlx"  # a config but no weights: mlx-lm names the full path
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    models = {
        "present": tiny(home / "models" / "tiny.gguf"),
        "missing": tiny(home / "models" / "missing.gguf"),
        "broken": {"source": str(broken), "engine": "mlx", "ttl": "forever"},
    }
    profile = home / ".mlx-serve" / "config.toml"
    profile.parent.mkdir()
    profile.write_text(profile_text(models))
    daemon = Daemon(profile, home / ".mlx-serve", env={"HOME": str(home)})
    DAEMONS.append(daemon)
    return daemon.start()


def home_of(daemon: Daemon) -> str:
    return daemon.env["HOME"]


def mentions(text: str, home: str) -> bool:
    """Does text name the home directory as a path (not `/home/al` inside `/home/alice`)?"""
    return re.search(rf"(?<![\w.~/-]){re.escape(home.rstrip('/'))}(?![\w.-])", text) is not None


def test_home_directory_is_redacted_in_errors_and_logs(home_daemon: Daemon) -> None:
    home, where = home_of(home_daemon), "~/models/broken-mlx"
    client = oai(home_daemon.url, "unused")
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, "broken", "home")
    failure = err.value.response.text
    assert err.value.status_code == 503 and where in failure and not mentions(failure, home), failure
    with pytest.raises(anthropic.APIStatusError) as err:
        anthropic.Anthropic(base_url=home_daemon.url, api_key="unused", max_retries=0).messages.create(
            model="broken", max_tokens=2, messages=[{"role": "user", "content": prompt("home")}]
        )
    assert where in err.value.response.text and not mentions(err.value.response.text, home)
    with pytest.raises(ollama.ResponseError) as olla_err:
        ollama.Client(host=home_daemon.url).chat(
            model="broken", messages=[{"role": "user", "content": prompt("home")}], options={"num_predict": 2}
        )
    assert where in str(olla_err.value) and not mentions(str(olla_err.value), home)
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, "missing", "home")
    assert not mentions(err.value.response.text, home)
    assert chat(client, "present", "home") == "present"

    status = {m["id"]: m for m in home_daemon.get_json("/status")["models"]}
    assert status["broken"]["state"] == "failed" and where in status["broken"]["error"]
    assert home_daemon.get_json("/health")["profile"]["path"] == "~/.mlx-serve/config.toml"
    for path in ("/status", "/health", "/ready", "/v1/models", "/api/tags", "/api/ps"):
        assert not mentions(httpx.get(home_daemon.url + path, timeout=30).text, home), path

    logs = "".join(p.read_text(errors="replace") for p in home_daemon.home.rglob("*.log"))
    assert "profile: ~/.mlx-serve/config.toml" in logs and where in logs, logs
    assert not mentions(logs, home), [line for line in logs.splitlines() if mentions(line, home)]


# ---- last: nothing secret in any log ------------------------------------------------------------


def test_logs_hold_no_keys_digests_or_prompts() -> None:
    assert SECRETS and PROMPTS and DAEMONS
    for daemon in DAEMONS:
        daemon.stop()  # flush the shutdown lines too
    forbidden = {s: "key" for s in SECRETS}
    forbidden.update({hashlib.sha256(s.encode()).hexdigest(): "digest" for s in SECRETS})
    forbidden.update({p: "prompt" for p in PROMPTS})
    logs = [(path, home_of(d)) for d in DAEMONS for path in d.home.rglob("*.log")]
    assert any("listening on" in path.read_text() for path, _ in logs)  # the right files
    for path, home in logs:
        text = path.read_text(errors="replace")
        for needle, what in forbidden.items():
            assert needle not in text, f"a {what} leaked into {path}"
        assert not mentions(text, home), f"the home directory {home} shows in {path}"
