"""The daemon as a process: live reload (every editor save style), invalid profiles, TTL, memory
budget, single-flight loads, SIGTERM drain, and the status/ps/reload CLI. Real daemon, real
llama.cpp engine, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mlx_serve_test_harness import profile_text  # loaded by conftest.py


def tiny(path: Path, **extra) -> dict:
    return {"source": str(path), "engine": "llama_cpp", "ttl": "forever", **extra}


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def models(daemon) -> dict[str, dict]:
    return {m["id"]: m for m in daemon.get_json("/status")["models"]}


def health(daemon) -> dict:
    return daemon.get_json("/health")


def complete(daemon, model: str, max_tokens: int = 32, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=120)


def stream_text(daemon, model: str, max_tokens: int, on_first=None) -> tuple[str, str | None]:
    """Stream a completion; returns (text, finish_reason). on_first() runs after the first chunk."""
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text, finish, first, done = [], None, True, False
    with httpx.stream("POST", f"{daemon.url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done = True
            if not line.startswith("data: ") or done:
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
            if first and on_first:
                first = False
                on_first()
    assert done, "the stream ended without data: [DONE]"
    return "".join(text), finish


def loaded_count(daemon, model_id: str) -> int:
    return daemon.logs().count(f"model {model_id} loaded")


# ---- invalid profiles -------------------------------------------------------------------------


def test_invalid_profile_at_start_serves_health_then_recovers_when_fixed(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf, kv_cache={"bits": 3})})
    report = health(daemon)["profile"]
    assert report["valid"] is False
    assert any("models.a.kv_cache.bits" in e and "config.toml:" in e for e in report["errors"]), report
    assert httpx.get(f"{daemon.url}/ready").status_code == 503
    daemon.profile.write_text(profile_text({"a": tiny(tiny_gguf)}))
    wait_for(lambda: httpx.get(f"{daemon.url}/ready").status_code == 200)
    assert complete(daemon, "a").status_code == 200


def test_invalid_edit_keeps_serving_the_old_profile(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf)})
    assert complete(daemon, "a").status_code == 200
    daemon.profile.write_text(profile_text({"a": tiny(tiny_gguf, ttl="soon")}))
    report = wait_for(lambda: (r := health(daemon)["profile"])["last_reload_successful"] is False and r)
    assert any(":" in e and "models.a.ttl" in e for e in report["errors"])
    assert complete(daemon, "a").status_code == 200  # still serving, model untouched
    assert httpx.get(f"{daemon.url}/ready").status_code == 200
    status = subprocess.run(
        [sys.executable, "-m", "mlx_serve.daemon", "status", "--url", daemon.url],
        capture_output=True,
        text=True,
    )
    assert status.returncode == 1 and "models.a.ttl" in status.stdout
    daemon.profile.write_text(profile_text({"a": tiny(tiny_gguf, ttl="1h")}))
    wait_for(lambda: health(daemon)["profile"]["last_reload_successful"])
    assert loaded_count(daemon, "a") == 1  # a ttl change is metadata: never a reload


# ---- editor save styles -----------------------------------------------------------------------


def _in_place(path: Path, text: str) -> None:
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def _truncate_then_write(path: Path, text: str) -> None:
    with open(path, "w") as f:  # VS Code: empty file first ...
        f.flush()
        os.fsync(f.fileno())
        time.sleep(0.6)  # ... longer than the debounce: the daemon sees an empty file
        f.write(text)


def _vim_rename(path: Path, text: str) -> None:
    probe = path.parent / "4913"
    probe.write_text("")
    probe.unlink()
    tmp = path.parent / f".{path.name}.swp.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def _delete_recreate(path: Path, text: str) -> None:
    path.unlink()
    time.sleep(0.6)
    path.write_text(text)


@pytest.mark.parametrize(
    "save", [_in_place, _truncate_then_write, _vim_rename, _delete_recreate], ids=lambda f: f.__name__[1:]
)
def test_every_editor_save_style_is_applied(start_daemon, tiny_gguf, save) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf, aliases=["first"])})
    stop = threading.Event()
    seen_missing: list[dict] = []

    def watch() -> None:  # the model must never disappear while a save is in progress
        while not stop.is_set():
            current = models(daemon)
            if "a" not in current:
                seen_missing.append(current)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        save(daemon.profile, profile_text({"a": tiny(tiny_gguf, aliases=["second"])}))
        wait_for(lambda: models(daemon)["a"]["aliases"] == ["second"])
    finally:
        stop.set()
        watcher.join()
    assert not seen_missing
    assert health(daemon)["profile"]["last_reload_successful"]


def test_symlinked_profile_follows_edits_to_its_target_and_a_repointed_link(tmp_path, tiny_gguf) -> None:
    """Dotfiles setups link ~/.mlx-serve/config.toml to a file elsewhere: editing that file, or
    pointing the link at another one, applies like any save (the watcher follows the link)."""
    from mlx_serve_test_harness import Daemon

    dotfiles, home = tmp_path / "dotfiles", tmp_path / "home"
    dotfiles.mkdir()
    home.mkdir()
    target, other = dotfiles / "mlx.toml", dotfiles / "other.toml"
    target.write_text(profile_text({"a": tiny(tiny_gguf, aliases=["first"])}))
    link = home / "config.toml"
    link.symlink_to(target)
    with Daemon(link, home) as daemon:
        assert models(daemon)["a"]["aliases"] == ["first"]
        target.write_text(profile_text({"a": tiny(tiny_gguf, aliases=["second"])}))
        wait_for(lambda: models(daemon)["a"]["aliases"] == ["second"])
        other.write_text(profile_text({"a": tiny(tiny_gguf, aliases=["third"])}))
        repointed = home / "config.toml.new"
        repointed.symlink_to(other)
        repointed.rename(link)  # `ln -sfn`: the link now names another file
        wait_for(lambda: models(daemon)["a"]["aliases"] == ["third"])
        other.write_text(profile_text({"a": tiny(tiny_gguf, aliases=["fourth"])}))  # the new target
        wait_for(lambda: models(daemon)["a"]["aliases"] == ["fourth"])
        target.write_text(profile_text({"a": tiny(tiny_gguf, aliases=["stale"])}))  # no longer linked
        time.sleep(1.0)
        assert models(daemon)["a"]["aliases"] == ["fourth"]


def test_invalid_profile_at_start_listens_on_the_port_it_declares(tmp_path, tiny_gguf) -> None:
    """Editors point at the profile's port: an invalid profile answers there (503 with the reason),
    not on the default port; a profile whose [server] table is itself invalid falls back to it."""
    from mlx_serve.profiles.loader import server_of_invalid
    from mlx_serve_test_harness import Daemon, free_port

    port = free_port()
    profile = tmp_path / "config.toml"
    bad_model = profile_text({"a": tiny(tiny_gguf, kv_cache={"bits": 3})}, server={"port": port})
    profile.write_text(bad_model)
    with Daemon(profile, tmp_path, port=port, port_from_profile=True) as daemon:
        assert health(daemon)["profile"]["valid"] is False
        ready = httpx.get(f"{daemon.url}/ready")
        assert ready.status_code == 503 and "kv_cache.bits" in ready.text
        assert "although the profile is invalid" in daemon.logs()
    assert server_of_invalid(profile).port == port
    profile.write_text(profile_text({"a": tiny(tiny_gguf)}, server={"port": "eleven"}))
    assert server_of_invalid(profile) is None
    profile.write_text("[server\nport = 1")
    assert server_of_invalid(profile) is None


# ---- reload while streaming -------------------------------------------------------------------


def test_reload_during_stream_leaves_unchanged_model_byte_identical(start_daemon, tiny_gguf) -> None:
    base = {"a": tiny(tiny_gguf), "b": tiny(tiny_gguf)}
    daemon = start_daemon(base)
    reference, finish = stream_text(daemon, "a", max_tokens=400)
    assert finish == "length"

    def edit() -> None:  # add a model, reload another, change a's metadata: all mid-stream
        edited = {"a": tiny(tiny_gguf, aliases=["renamed"]), "b": tiny(tiny_gguf, context_length=1024)}
        edited["c"] = tiny(tiny_gguf)
        daemon.profile.write_text(profile_text(edited))
        subprocess.run([sys.executable, "-m", "mlx_serve.daemon", "reload", "--url", daemon.url], check=True)

    text, finish = stream_text(daemon, "a", max_tokens=400, on_first=edit)
    assert finish == "length"
    assert text == reference
    current = models(daemon)
    assert set(current) == {"a", "b", "c"} and current["a"]["aliases"] == ["renamed"]
    assert loaded_count(daemon, "a") == 1


def test_port_change_moves_the_listener_without_dropping_a_stream(tmp_path, tiny_gguf) -> None:
    from mlx_serve_test_harness import Daemon, free_port

    old_port, new_port = free_port(), free_port()
    profile = tmp_path / "config.toml"
    profile.write_text(profile_text({"a": tiny(tiny_gguf)}, server={"port": old_port}))
    daemon = Daemon(profile, tmp_path / "home", port=old_port, port_from_profile=True).start()
    try:
        reference, _ = stream_text(daemon, "a", max_tokens=300)

        def move() -> None:
            profile.write_text(profile_text({"a": tiny(tiny_gguf)}, server={"port": new_port}))
            wait_for(lambda: "listener moved" in daemon.logs())

        text, finish = stream_text(daemon, "a", max_tokens=300, on_first=move)
        assert (text, finish) == (reference, "length")  # the stream on the old socket finished intact
        assert httpx.get(f"http://127.0.0.1:{new_port}/health").status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{old_port}/health")
    finally:
        daemon.stop()


def test_metrics_settings_apply_live(start_daemon, tiny_gguf) -> None:
    from mlx_serve_test_harness import free_port

    daemon = start_daemon({"a": tiny(tiny_gguf)})
    assert httpx.get(f"{daemon.url}/metrics").status_code == 200

    def reload_to(**metrics) -> None:
        before = health(daemon)["profile"]["sha256"]
        daemon.profile.write_text(profile_text({"a": tiny(tiny_gguf)}, metrics=metrics))
        wait_for(lambda: health(daemon)["profile"]["sha256"] != before)

    def scrape(url: str) -> int:
        try:
            return httpx.get(url, timeout=5).status_code
        except httpx.ConnectError:
            return 0

    reload_to(path="/prom")
    assert scrape(f"{daemon.url}/prom") == 200 and scrape(f"{daemon.url}/metrics") == 404
    reload_to(enabled=False, path="/prom")
    assert scrape(f"{daemon.url}/prom") == 404
    port = free_port()
    reload_to(listen=f"127.0.0.1:{port}")
    separate = f"http://127.0.0.1:{port}/metrics"
    wait_for(lambda: scrape(separate) == 200)
    assert "mlx_serve_requests_total" in httpx.get(separate).text
    assert scrape(f"{daemon.url}/metrics") == 404  # only on its own listener now
    reload_to()
    wait_for(lambda: scrape(separate) == 0)
    assert scrape(f"{daemon.url}/metrics") == 200


def test_engine_libraries_are_imported_at_start_and_ready_waits_for_them(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf)})
    wait_for(lambda: httpx.get(f"{daemon.url}/ready").status_code == 200)
    assert "engine runtimes ready: llama_cpp" in daemon.logs()
    assert models(daemon)["a"]["state"] != "loaded"  # imported, not loaded


# ---- registry behaviour on a real engine --------------------------------------------------------


def test_concurrent_first_requests_load_once(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf)})
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(complete(daemon, "a", 8).status_code))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    assert loaded_count(daemon, "a") == 1


def test_ttl_unload(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf, ttl="1s")})
    assert complete(daemon, "a").status_code == 200
    assert models(daemon)["a"]["state"] == "loaded"
    wait_for(lambda: models(daemon)["a"]["state"] == "unloaded", timeout=10)
    assert "model a unloaded (ttl)" in daemon.logs()


def test_model_over_memory_budget_gets_503_with_reason(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf)}, server={"memory_budget": "1MiB"})
    resp = complete(daemon, "a")
    assert resp.status_code == 503
    assert "Retry-After" in resp.headers
    assert "needs about" in resp.json()["error"]["message"]


def test_broken_model_is_marked_failed_and_others_keep_working(start_daemon, tiny_gguf, tmp_path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(256))
    daemon = start_daemon({"a": tiny(tiny_gguf), "broken": tiny(broken)})
    resp = complete(daemon, "broken")
    assert resp.status_code == 503 and "broken" in resp.json()["error"]["message"]
    assert models(daemon)["broken"]["state"] == "failed"
    assert complete(daemon, "a").status_code == 200


# ---- process life -----------------------------------------------------------------------------


def test_sigterm_drains_in_flight_stream_then_exits_zero(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf)}, server={"drain_timeout": 60.0})
    reference, _ = stream_text(daemon, "a", max_tokens=600)
    sigterm = lambda: daemon.proc.send_signal(signal.SIGTERM)  # noqa: E731
    text, finish = stream_text(daemon, "a", max_tokens=600, on_first=sigterm)
    assert (text, finish) == (reference, "length")  # finished in full, not cut
    assert daemon.proc.wait(30) == 0
    assert "draining" in daemon.logs()


def test_stream_longer_than_the_drain_budget_ends_with_a_final_event(start_daemon, smollm2_gguf) -> None:
    # SmolLM2, not the tiny model: the tiny one can fill its whole context within the budget and
    # end by itself (finish "length" without the drain ever cutting it).
    daemon = start_daemon({"a": tiny(smollm2_gguf)}, server={"drain_timeout": 1.0})
    started = time.monotonic()
    sigterm = lambda: daemon.proc.send_signal(signal.SIGTERM)  # noqa: E731
    text, finish = stream_text(daemon, "a", max_tokens=100_000, on_first=sigterm)
    assert finish == "length" and text  # a proper end of stream with [DONE], not a cut connection
    assert daemon.proc.wait(30) == 0
    assert time.monotonic() - started < 15
    assert "drain time is up" in daemon.logs()


def test_status_ps_reload_cli(start_daemon, tiny_gguf) -> None:
    daemon = start_daemon({"a": tiny(tiny_gguf, pin=True)})
    complete(daemon, "a", 4)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mlx_serve.daemon", *args, "--url", daemon.url],
            capture_output=True,
            text=True,
        )

    status = cli("status")
    assert status.returncode == 0 and "reload    ok" in status.stdout and "loaded" in status.stdout
    ps = cli("ps")
    assert "a " in ps.stdout and "pinned" in ps.stdout and "MiB" in ps.stdout
    assert cli("reload").stdout.startswith("unchanged")
    assert json.loads(cli("ps", "--json").stdout)[0]["id"] == "a"


# ---- the editor lane ----------------------------------------------------------------------------


def test_fim_is_admitted_before_queued_long_generations(start_daemon, tiny_gguf, tiny_fim_gguf) -> None:
    daemon = start_daemon({"m": tiny(tiny_fim_gguf)})
    finished: list[str] = []

    def run(name: str, body: dict) -> None:
        body = {"model": "m", "temperature": 0, **body}
        resp = httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=300)
        finished.append(name if resp.status_code == 200 else f"{name}: {resp.status_code}")

    long = threading.Thread(target=run, args=("long", {"prompt": "Once", "max_tokens": 1000}))
    long.start()
    wait_for(lambda: models(daemon)["m"]["active"] == 1)
    queued = threading.Thread(target=run, args=("queued", {"prompt": "Twice", "max_tokens": 300}))
    queued.start()
    wait_for(lambda: models(daemon)["m"]["waiting"] == 1)
    fim = threading.Thread(target=run, args=("fim", {"prompt": "def f(", "suffix": "):\n", "max_tokens": 8}))
    fim.start()
    for thread in (long, queued, fim):
        thread.join()
    assert finished == ["long", "fim", "queued"]


def test_new_fim_request_supersedes_the_same_clients_previous_one(start_daemon, tiny_fim_gguf) -> None:
    daemon = start_daemon({"m": tiny(tiny_fim_gguf, max_concurrency=2)})
    headers = {"User-Agent": "editor/1.0"}
    body = {"model": "m", "prompt": "def f(", "suffix": "):\n", "temperature": 0, "stream": True}
    chunks = 0
    with httpx.stream(
        "POST", f"{daemon.url}/v1/completions", json={**body, "max_tokens": 1500}, headers=headers, timeout=60
    ) as first:
        lines = first.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        newer = httpx.post(
            f"{daemon.url}/v1/completions",
            json={**body, "stream": False, "max_tokens": 8},
            headers=headers,
            timeout=60,
        )
        assert newer.status_code == 200 and newer.json()["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.RemoteProtocolError):  # the superseded stream is cut short
            for line in lines:
                chunks += line.startswith("data: {")
    assert chunks < 1400
