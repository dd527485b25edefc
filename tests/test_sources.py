"""Model sources: Hugging Face downloads (the real huggingface_hub client against a fake hub on
loopback), GGUF quant selection, quantize-on-load, GGUF to MLX, the cache CLI, LM Studio discovery,
and a daemon that keeps serving when one model's download fails."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mlx_serve.daemon.cli.main import main as cli_main
from mlx_serve.engines.errors import ModelLoadError
from mlx_serve.engines.sources.hub import cached_repo, fetch_repo
from mlx_serve.engines.sources.lmstudio import discover, resolve_lmstudio
from mlx_serve.engines.sources.progress import DownloadEvent, add_progress_listener, remove_progress_listener
from mlx_serve.engines.sources.repo_files import parse_hub_source, plan_files, select_gguf
from mlx_serve.engines.sources.resolve import cache, mlx_model_dir
from mlx_serve.profiles.schema import ModelSpec

MLX_REPO, GGUF_REPO, BIN_REPO = "test-org/tiny-mlx", "test-org/tiny-GGUF", "test-org/pytorch-only"


# ---- a fake hub: the endpoints huggingface_hub calls, served the way huggingface.co serves them -----
class FakeHub:
    """GET /api/models/{repo}/revision/{rev} (model_info with siblings), HEAD/GET
    /{repo}/resolve/{rev}/{file} (LFS files: 302 to a CDN on another origin, with X-Linked-Etag =
    sha256 and X-Linked-Size; others: 200 with a git-sha1 ETag), GET /cdn/{sha256} with Range, and 404s
    carrying X-Error-Code. Test knobs: cut a file's body once after N bytes, fail Range requests."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_once: dict[str, int] = {}  # sha256 -> bytes sent before the connection drops
        self.fail_ranged = 0  # answer this many Range requests with 503
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.cdn = f"http://localhost:{self.server.server_port}"  # another origin, like the real CDN
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_repo(self, repo: str, files: dict[str, bytes], revisions: tuple[str, ...] = ("main",)) -> str:
        commit = hashlib.sha1(repo.encode()).hexdigest()
        self.repos[repo] = {"commit": commit, "revisions": {*revisions, commit}, "files": files}
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    def downloads(self) -> list[str]:
        return [p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in self.requests if "/resolve/" in p]


def _lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".gguf", ".bin"))


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _send(
            self, status: int, headers: dict[str, str], body: bytes, head: bool, cut: int | None = None
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body if cut is None else body[:cut])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True  # the rest of the body never comes

        def _error(self, code: str, head: bool) -> None:
            self._send(
                404, {"X-Error-Code": code, "Content-Type": "application/json"}, b'{"error":"x"}', head
            )

        def _route(self, head: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            hub.requests.append((self.command, urllib.parse.unquote(path), self.headers.get("Range")))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                return self._info(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2]), head)
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m[1], urllib.parse.unquote(m[2]), urllib.parse.unquote(m[3]), head)
            if m := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
                return self._cdn(m[1], head)
            self._send(404, {}, b"not found", head)

        def _repo(self, repo: str, revision: str, head: bool) -> dict[str, Any] | None:
            if repo not in hub.repos:
                self._error("RepoNotFound", head)
                return None
            if revision not in hub.repos[repo]["revisions"]:
                self._error("RevisionNotFound", head)
                return None
            return hub.repos[repo]

        def _info(self, repo: str, revision: str, head: bool) -> None:
            if (info := self._repo(repo, revision, head)) is None:
                return
            siblings = []
            for name, data in info["files"].items():
                sibling: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": _git_sha(data)}
                if _lfs(name):
                    sha = hashlib.sha256(data).hexdigest()
                    sibling["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
                siblings.append(sibling)
            body = json.dumps({"id": repo, "sha": info["commit"], "siblings": siblings}).encode()
            self._send(200, {"Content-Type": "application/json"}, body, head)

        def _resolve(self, repo: str, revision: str, name: str, head: bool) -> None:
            if (info := self._repo(repo, revision, head)) is None:
                return
            if name not in info["files"]:
                return self._error("EntryNotFound", head)
            data = info["files"][name]
            headers = {"X-Repo-Commit": info["commit"], "ETag": f'"{_git_sha(data)}"'}
            if not _lfs(name):
                return self._send(200, headers, data, head)
            sha = hashlib.sha256(data).hexdigest()
            headers |= {
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "Location": f"{hub.cdn}/cdn/{sha}",
            }
            self._send(302, headers, b"", head)

        def _cdn(self, sha: str, head: bool) -> None:
            data, ranged = hub.blobs[sha], self.headers.get("Range")
            if ranged and hub.fail_ranged > 0:
                hub.fail_ranged -= 1
                return self._send(503, {}, b"unavailable", head)
            start = int(re.match(r"bytes=(\d+)-", ranged)[1]) if ranged else 0  # type: ignore[index]
            headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
            if ranged:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            cut = hub.cut_once.pop(sha, None) if not head and not ranged else None
            self._send(206 if ranged else 200, headers, data[start:], head, cut)

    return Handler


def _git_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def hub(tiny_mlx: Path, tiny_gguf: Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    files = {p.name: p.read_bytes() for p in tiny_mlx.iterdir() if p.is_file()}
    fake.add_repo(MLX_REPO, files | {"README.md": b"# tiny", "pytorch_model.bin": b"\0" * 64}, ("main", "v1"))
    gguf = tiny_gguf.read_bytes()
    fake.add_repo(
        GGUF_REPO, {"tiny-Q4_K_M.gguf": gguf, "tiny-Q8_0.gguf": gguf + b"\0" * 32, "README.md": b"#"}
    )
    fake.add_repo(BIN_REPO, {"config.json": b"{}", "pytorch_model.bin": b"\0" * 64})
    yield fake
    fake.server.shutdown()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> dict[str, str]:
    values = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": hub.url,
        "MLX_SERVE_HOME": str(tmp_path / "home"),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "MLX_SERVE_LMSTUDIO_MODELS"):
        monkeypatch.delenv(key, raising=False)
    hub.requests.clear()
    return values


def spec(source: str, **kw: Any) -> ModelSpec:
    return ModelSpec(source=source, **kw)


# ---- quant selection and file plans (pure) ---------------------------------------------------------
QUANTS = ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-IQ4_XS.gguf", "README.md", "mmproj-m-f16.gguf"]


def test_quant_selection() -> None:
    assert select_gguf("m", QUANTS, None, "repo") == ["m-Q4_K_M.gguf"]  # default when several
    assert select_gguf("m", QUANTS, "q8_0", "repo") == ["m-Q8_0.gguf"]  # case-insensitive
    assert select_gguf("m", ["only-Q5_K_S.gguf"], None, "repo") == ["only-Q5_K_S.gguf"]
    with pytest.raises(
        ModelLoadError, match=r"no Q5_K_M GGUF; available quants: IQ4_XS, Q4_K_M, Q8_0"
    ) as exc:
        select_gguf("chat", QUANTS, "Q5_K_M", "repo")
    assert exc.value.model_id == "chat"
    with pytest.raises(
        ModelLoadError, match="several GGUF quants and no Q4_K_M; set gguf_quant to one of: Q6_K, Q8_0"
    ):
        select_gguf("m", ["a-Q8_0.gguf", "a-Q6_K.gguf"], None, "repo")
    with pytest.raises(ModelLoadError, match="matches several files"):
        select_gguf("m", ["a-Q4_K_M.gguf", "a-Q4_K_S.gguf"], "Q4_K", "repo")
    split = [
        "big/x-Q8_0-00002-of-00003.gguf",
        "big/x-Q8_0-00001-of-00003.gguf",
        "big/x-Q8_0-00003-of-00003.gguf",
    ]
    assert select_gguf("m", split, "Q8_0", "repo") == sorted(split)  # all parts, the first one first
    with pytest.raises(ModelLoadError, match="has 2 of its 3 parts"):
        select_gguf("m", split[:2], None, "repo")


def test_file_plans_and_source_names() -> None:
    listing: dict[str, int | None] = {n: 1 for n in ("config.json", "model.safetensors", "tokenizer.json")}
    listing |= {"pytorch_model.bin": 1, "README.md": 1, "onnx/model.onnx": 1, "consolidated.safetensors": 1}
    files, entry = plan_files("m", spec("a/b"), None, listing, "repo")
    assert (files, entry) == (["config.json", "model.safetensors", "tokenizer.json"], "")
    with pytest.raises(ModelLoadError, match=r"no usable weights.*only \.bin weights"):
        plan_files("m", spec("a/b"), None, {"config.json": 1, "pytorch_model.bin": 1}, "repo")
    assert plan_files("m", spec("a/b"), None, dict.fromkeys(QUANTS, 1), "repo") == (
        ["m-Q4_K_M.gguf"],
        "m-Q4_K_M.gguf",
    )
    assert parse_hub_source("m", "org/repo/sub/f-Q8_0.gguf") == ("org/repo", "sub/f-Q8_0.gguf")
    for bad in ("just-a-name", "org/repo/config.json"):
        with pytest.raises(ModelLoadError, match="repo id|must be a .gguf"):
            parse_hub_source("m", bad)


# ---- downloads --------------------------------------------------------------------------------------
def test_download_then_cached_then_offline(
    env: dict[str, str], hub: FakeHub, tiny_mlx: Path, monkeypatch
) -> None:
    events: list[DownloadEvent] = []
    add_progress_listener(events.append)
    try:
        path = fetch_repo("tiny", spec(MLX_REPO))
    finally:
        remove_progress_listener(events.append)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).read_bytes() == (tiny_mlx / name).read_bytes()
    assert set(hub.downloads()) == {p.name for p in tiny_mlx.iterdir()}  # no README, no .bin
    assert [e.kind for e in events][0] == "start" and events[-1].kind == "done"
    assert (
        sum(e.delta for e in events) == events[-1].total == sum(p.stat().st_size for p in tiny_mlx.iterdir())
    )
    hub.requests.clear()
    assert fetch_repo("tiny", spec(MLX_REPO)) == path  # cached: the network is not touched
    assert fetch_repo("tiny", spec(MLX_REPO, revision="v1")) == path  # same commit, via the hub's listing
    weights = (tiny_mlx / "model.safetensors").read_bytes()
    (path / "model.safetensors").resolve().write_bytes(b"damaged")  # a cached file damaged by hand
    assert (fetch_repo("tiny", spec(MLX_REPO)) / "model.safetensors").read_bytes() == weights  # fetched again
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_repo("tiny", spec(MLX_REPO)) == path and cached_repo("tiny", spec(MLX_REPO)) == path
    assert hub.requests == []
    with pytest.raises(ModelLoadError, match=r"'gguf'.*HF_HUB_OFFLINE.*mlx-serve pull gguf"):
        fetch_repo("gguf", spec(GGUF_REPO))


def test_gguf_repo_downloads_only_the_chosen_quant(
    env: dict[str, str], hub: FakeHub, tiny_gguf: Path, monkeypatch
) -> None:
    path = fetch_repo("g", spec(GGUF_REPO))
    assert path.name == "tiny-Q4_K_M.gguf" and path.read_bytes() == tiny_gguf.read_bytes()
    assert set(hub.downloads()) == {"tiny-Q4_K_M.gguf"}
    assert fetch_repo("g8", spec(GGUF_REPO, gguf_quant="q8_0")).name == "tiny-Q8_0.gguf"
    assert fetch_repo("f", spec(f"{GGUF_REPO}/tiny-Q8_0.gguf")).name == "tiny-Q8_0.gguf"
    with pytest.raises(ModelLoadError, match="no Q5_K_M GGUF; available quants: Q4_K_M, Q8_0"):
        fetch_repo("g5", spec(GGUF_REPO, gguf_quant="Q5_K_M"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the listing kept with the cache answers the same offline
    assert fetch_repo("g", spec(GGUF_REPO)).name == "tiny-Q4_K_M.gguf"
    with pytest.raises(ModelLoadError, match="available quants: Q4_K_M, Q8_0"):
        fetch_repo("g5", spec(GGUF_REPO, gguf_quant="Q5_K_M"))


def test_bad_sources_name_the_model(env: dict[str, str], hub: FakeHub, monkeypatch) -> None:
    cases = [
        (spec("test-org/missing"), r"'m1'.*repo 'test-org/missing' does not exist"),
        (spec(MLX_REPO, revision="nope"), r"'m2'.*revision 'nope' does not exist in .*tiny-mlx"),
        (spec(BIN_REPO), r"'m3'.*no usable weights.*only \.bin weights"),
    ]
    for i, (model_spec, pattern) in enumerate(cases, 1):
        with pytest.raises(ModelLoadError, match=pattern):
            fetch_repo(f"m{i}", model_spec)
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(ModelLoadError, match=r"'m4'.*no space left.*next attempt resumes"):
        fetch_repo("m4", spec(MLX_REPO))
    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ModelLoadError, match=r"'m5'.*network error.*next attempt resumes"):
        fetch_repo("m5", spec(MLX_REPO))


def test_interrupted_download_resumes_and_never_uses_partial_files(
    env: dict[str, str], hub: FakeHub, tiny_mlx: Path
) -> None:
    weights = (tiny_mlx / "model.safetensors").read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    # The connection drops after 15 MB (huggingface_hub writes 10 MiB chunks, so 10 MiB reach the disk);
    # its in-attempt retry asks for the rest with Range and meets a 503: this attempt fails.
    hub.cut_once[sha], hub.fail_ranged = 15_000_000, 1
    with pytest.raises(ModelLoadError, match=r"'tiny'.*network error.*the next attempt resumes"):
        fetch_repo("tiny", spec(MLX_REPO))
    storage = Path(env["HF_HOME"]) / "hub" / "models--test-org--tiny-mlx"
    partial = storage / "blobs" / f"{sha}.incomplete"
    kept, failed_attempt = partial.stat().st_size, len(hub.requests)
    assert 0 < kept <= 15_000_000 and hub.fail_ranged == 0
    assert not list(storage.glob("snapshots/*/model.safetensors"))  # nothing half-written is linked
    assert cached_repo("tiny", spec(MLX_REPO)) is None
    path = fetch_repo("tiny", spec(MLX_REPO))
    assert ("GET", f"/cdn/{sha}", f"bytes={kept}-") in hub.requests[failed_attempt:]  # resumed
    assert (path / "model.safetensors").read_bytes() == weights and not partial.exists()


# ---- quantize on load, GGUF to MLX, the cache -------------------------------------------------------
def _greedy_tokens(model_dir: Path, n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(str(model_dir))
    prompt = mx.array(tokenizer.encode("Once upon a time"))
    return [int(tok) for tok, _ in generate_step(prompt, model, max_tokens=n)]


def test_quantize_on_load_builds_once_and_rebuilds_damage(env: dict[str, str], tiny_mlx: Path) -> None:
    source_bytes = (tiny_mlx / "model.safetensors").stat().st_size
    start, paths = cache.builds["quantized"], {}
    for recipe, bits in (("q4", 4), ("q8", 8)):
        before = cache.builds["quantized"]
        out = mlx_model_dir("t", spec(str(tiny_mlx), quantize=recipe))
        assert cache.builds["quantized"] == before + 1
        assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == bits
        assert (out / "model.safetensors").stat().st_size < source_bytes / (3 if bits == 4 else 1.5)
        assert len(_greedy_tokens(out, 8)) == 8  # loads in mlx-lm and generates (the tiny model never stops)
        assert mlx_model_dir("t", spec(str(tiny_mlx), quantize=recipe)) == out  # second load: the cache
        assert cache.builds["quantized"] == before + 1
        paths[recipe] = out
    regrouped = mlx_model_dir("t", spec(str(tiny_mlx), quantize="q4", group_size=32))
    assert (
        regrouped not in paths.values() and cache.builds["quantized"] == start + 3
    )  # a recipe change: a new entry
    q4 = paths["q4"]
    for damage in (lambda: (q4 / "model.safetensors").unlink(), lambda: (q4 / cache.MARKER).unlink(),
                   lambda: (q4 / "model.safetensors").write_bytes(b"truncated")):  # fmt: skip
        damage()
        assert mlx_model_dir("t", spec(str(tiny_mlx), quantize="q4")) == q4 and cache.is_valid(q4)
    assert cache.builds["quantized"] == start + 6
    with pytest.raises(ModelLoadError, match=r"'t'.*already quantized \(4-bit\)"):
        mlx_model_dir("t", spec(str(q4), quantize="q8"))


def test_gguf_to_mlx_is_cached_and_reused(
    env: dict[str, str], smollm2_gguf: Path, smollm2_mlx: Path, tmp_path: Path
) -> None:
    before = cache.builds["gguf-mlx"]
    smol = mlx_model_dir("smol", spec(str(smollm2_gguf), engine="mlx"))
    assert mlx_model_dir("smol", spec(str(smollm2_gguf), engine="mlx")) == smol
    assert cache.builds["gguf-mlx"] == before + 1
    # A working model, the converter's own (test_models_smoke.py checks that one against llama.cpp):
    # the same greedy tokens here. Words are not checked: they are the CPU kernels' choice.
    assert _greedy_tokens(smol, 6) == _greedy_tokens(smollm2_mlx, 6)
    with pytest.raises(ModelLoadError, match=r"'smol'.*already quantized \(4-bit\)"):
        mlx_model_dir("smol", spec(str(smollm2_gguf), engine="mlx", quantize="q8"))
    split = tmp_path / "big-Q8_0-00001-of-00002.gguf"
    split.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"'big'.*split GGUF.*llama_cpp"):
        mlx_model_dir("big", spec(str(split), engine="mlx"))
    assert cache.builds["gguf-mlx"] == before + 1


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli_main(list(argv))
    return code, capsys.readouterr().out


def test_pull_models_and_cache_cli(
    env: dict[str, str], hub: FakeHub, tmp_path: Path, tiny_mlx: Path, capsys
) -> None:
    profile = tmp_path / "config.toml"
    profile.write_text(
        f'[models.hubq4]\nsource = "{MLX_REPO}"\nengine = "mlx"\nquantize = "q4"\n\n'
        f'[models.local]\nsource = "{tiny_mlx}"\nengine = "mlx"\n'
    )
    args = ("--profile", str(profile), "--url", "http://127.0.0.1:9")
    code, out = _cli(capsys, "models", *args, "--json")
    rows = {r["id"]: r for r in json.loads(out)["models"]}
    assert code == 0 and not rows["hubq4"]["downloaded"] and rows["hubq4"]["status"] == "not downloaded"
    assert rows["local"]["quantization"] == "full precision" and rows["local"]["disk_bytes"] > 25_000_000
    code, out = _cli(capsys, "pull", "hubq4", "--profile", str(profile))
    assert code == 0 and "hubq4: ready" in out
    rows = {r["id"]: r for r in json.loads(_cli(capsys, "models", *args, "--json")[1])["models"]}
    assert (
        rows["hubq4"]["status"] == "downloaded, converted"
        and rows["hubq4"]["quantization"] == "q4/64 on load"
    )
    orphan = mlx_model_dir("old", spec(str(tiny_mlx), quantize="q8"))  # an entry no profile model uses
    capsys.readouterr()  # mlx-lm's conversion prints
    code, out = _cli(capsys, "cache", "ls", "--profile", str(profile), "--json")
    entries = json.loads(out)
    assert sorted(e["used_by"] for e in entries) == [[], ["hubq4"]] and all(e["valid"] for e in entries)
    assert next(e["path"] for e in entries if not e["used_by"]) == str(orphan)
    code, out = _cli(capsys, "cache", "prune", "--profile", str(profile), "--dry-run")
    assert "would remove 1 entries" in out and orphan.exists()
    code, out = _cli(capsys, "cache", "prune", "--profile", str(profile))
    assert code == 0 and not orphan.exists() and len(cache.list_entries()) == 1
    code, out = _cli(capsys, "cache", "prune", "--all")
    assert "removed 1 entries" in out and cache.list_entries() == []


def test_lmstudio_discovery(tmp_path: Path, monkeypatch, tiny_mlx: Path, capsys) -> None:
    root = tmp_path / "lmstudio"
    gguf_dir = root / "lmstudio-community" / "Tiny-GGUF"
    gguf_dir.mkdir(parents=True)
    for name in ("Tiny-Q4_K_M.gguf", "Tiny-Q8_0.gguf"):
        (gguf_dir / name).write_bytes(b"GGUF")
    shutil.copytree(tiny_mlx, root / "mlx-community" / "Tiny-mlx")
    (root / "someone" / "empty").mkdir(parents=True)
    monkeypatch.setenv("MLX_SERVE_LMSTUDIO_MODELS", str(root))
    found = {m.source: m for m in discover()}
    assert set(found) == {"lmstudio:lmstudio-community/Tiny-GGUF", "lmstudio:mlx-community/Tiny-mlx"}
    assert found["lmstudio:lmstudio-community/Tiny-GGUF"].quants == ("Q4_K_M", "Q8_0")
    assert resolve_lmstudio("m", "lmstudio-community/Tiny-GGUF", None).name == "Tiny-Q4_K_M.gguf"
    assert resolve_lmstudio("m", "lmstudio-community/Tiny-GGUF", "Q8_0").name == "Tiny-Q8_0.gguf"
    assert resolve_lmstudio("m", "mlx-community/Tiny-mlx", None) == root / "mlx-community" / "Tiny-mlx"
    with pytest.raises(ModelLoadError, match=r"'m'.*LM Studio model 'a/b' not found in .*lmstudio"):
        resolve_lmstudio("m", "a/b", None)
    profile = tmp_path / "p.toml"
    profile.write_text('[models.lm]\nsource = "lmstudio:mlx-community/Tiny-mlx"\nengine = "mlx"\n')
    code, out = _cli(
        capsys, "models", "--profile", str(profile), "--url", "http://127.0.0.1:9", "--discover", "--json"
    )
    body = json.loads(out)
    assert body["models"][0]["path"] == str(root / "mlx-community" / "Tiny-mlx")
    assert {m["source"] for m in body["lmstudio"]} == set(found)


# ---- the daemon -------------------------------------------------------------------------------------
def _complete(url: str, model: str) -> tuple[int, str]:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 4}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_daemon_serves_others_when_a_download_fails(
    start_daemon, hub: FakeHub, tiny_gguf: Path, tmp_path: Path
) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    models = {
        "ghost": {"source": "test-org/does-not-exist", "engine": "mlx"},
        "tiny": {"source": str(tiny_gguf), "engine": "llama_cpp"},
    }
    daemon = start_daemon(models, env=env)
    status, body = _complete(daemon.url, "ghost")
    assert (
        status == 503 and "ghost" in body and "test-org/does-not-exist" in body and "does not exist" in body
    )
    status, body = _complete(daemon.url, "tiny")
    assert status == 200 and json.loads(body)["choices"][0]["text"]


def test_daemon_downloads_on_demand_then_starts_offline(
    start_daemon, hub: FakeHub, tmp_path: Path, capsys
) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    models = {"hubtiny": {"source": MLX_REPO, "engine": "mlx"}}
    online = start_daemon(models, env=env)
    status, _ = _complete(online.url, "hubtiny")
    assert status == 200 and "downloading" in online.logs()
    with urllib.request.urlopen(online.url + "/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert re.search(r'mlx_serve_download_bytes_total\{model="hubtiny"\} [1-9]', metrics)
    assert "mlx_serve_downloads_in_progress 0.0" in metrics
    online.stop()
    hub.requests.clear()
    offline = start_daemon(models, env=env | {"HF_HUB_OFFLINE": "1"})
    status, _ = _complete(offline.url, "hubtiny")
    assert status == 200 and hub.requests == []
    code, out = _cli(capsys, "models", "--profile", str(offline.profile), "--url", offline.url, "--json")
    assert json.loads(out)["models"][0]["state"] == "loaded"
