"""Observability end to end, with a real Prometheus.

One real daemon (the tiny model on llama.cpp and on MLX, the real SmolLM2 on llama.cpp with
prompt-lookup speculative decoding asked to repeat a sentence, and a model whose file is missing)
is scraped every second by a real Prometheus started from the shipped scrape config, with the
shipped alert rules loaded. Traffic goes through all three dialects in two rounds (so new series
have a rate), with a failed and a successful profile reload, a manual unload and a refused Host
header in between. Then: `promtool check metrics` on the exposition,
`promtool check rules` and a promtool unit test of every shipped alert, every PromQL expression of
the shipped dashboard returns data from that Prometheus, unknown model names add no series, and
`mlx-serve monitoring export` writes the assets.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from mlx_serve.daemon.cli.main import main as cli_main
from mlx_serve.daemon.monitoring import ALERT_RULES, ASSETS, DASHBOARD, SCRAPE_CONFIG, asset_text
from mlx_serve_test_harness import Daemon, free_port, profile_text  # loaded by conftest.py

PROMPT = "one two three four one two three four one two three four one two three"
REPEAT = "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank."
RATE_INTERVAL = "1m"
ALL_MODELS = ".*"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run .ci/system-deps (Debian package 'prometheus')")
    return path


@dataclass
class Stack:
    daemon: Daemon
    prometheus: str
    workdir: Path
    fresh_metrics: str = ""
    fresh_states: dict[str, str] = field(default_factory=dict)


# ---- helpers ----------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s")


def prom_query(base: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_scraped_after(base: str, moment: float) -> None:
    """Until Prometheus holds a scrape of the daemon that started after `moment` (wall clock)."""

    def scraped() -> bool:
        # timestamp() of a plain selector is the sample's time (of an expression it is "now").
        result = prom_query(base, 'timestamp(up{job="mlx-serve"})')
        if not result or float(result[0]["value"][1]) <= moment:
            return False
        assert prom_query(base, 'up{job="mlx-serve"}')[0]["value"][1] == "1"
        return True

    wait_for(scraped, timeout=30, what=f"a scrape after {moment}")


def statuses(daemon: Daemon) -> dict[str, str]:
    return {m["id"]: m["state"] for m in daemon.get_json("/status")["models"]}


def series_of(exposition: str) -> set[str]:
    """Series identities (name and labels) of an exposition, without their values."""
    out = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            out.add(line.rsplit(" ", 1)[0])
    return out


def sample(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in exposition.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        ident, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in ident for k, v in labels.items()):
            total, found = total + float(value), True
    assert found, f"no sample {name}{labels}"
    return total


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel (rows' nested panels included) and annotation."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"{panel['title']} [{target['refId']}]", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for note in dashboard.get("annotations", {}).get("list", []):
        if note.get("expr"):
            found.append((f"annotation {note['name']}", note["expr"]))
    return found


def substitute(expr: str) -> str:
    """Grafana's template variables -> values a plain Prometheus query accepts."""
    expr = re.sub(r"\$\{model(?::\w+)?\}|\$model\b", ALL_MODELS, expr)
    expr = re.sub(r"\$\{?__rate_interval\}?|\$\{?__interval\}?|\$\{?__range\}?", RATE_INTERVAL, expr)
    assert "$" not in expr, f"unsubstituted template variable in {expr}"
    return expr


# ---- traffic ----------------------------------------------------------------------------------


def drive(client: httpx.Client) -> None:
    """One round through all three dialects, streaming and not, on both engines, plus errors."""
    chat = [{"role": "user", "content": PROMPT}]
    calls: list[tuple[str, dict, int, str]] = []  # path, body, status, text the body must contain
    for model in ("tiny", "tiny-mlx"):
        short = {"model": model, "max_tokens": 12}
        ollama = {"model": model, "options": {"num_predict": 12}}
        calls += [
            ("/v1/chat/completions", {**short, "messages": chat}, 200, '"chat.completion"'),
            ("/v1/chat/completions", {**short, "messages": chat, "stream": True}, 200, "data: [DONE]"),
            ("/v1/completions", {**short, "prompt": PROMPT}, 200, '"text_completion"'),
            ("/v1/messages", {**short, "messages": chat}, 200, '"message"'),
            ("/v1/messages", {**short, "messages": chat, "stream": True}, 200, "message_stop"),
            ("/api/chat", {**ollama, "messages": chat, "stream": False}, 200, '"done":true'),
            ("/api/generate", {**ollama, "prompt": PROMPT}, 200, '"done":true'),  # NDJSON stream
        ]
    # Prompt lookup drafts from the prompt, and SmolLM2 copies it: drafts are proposed and accepted
    # (the metrics say so below; the words themselves are the CPU kernels' choice, not checked here).
    repeat = {"model": "smol", "messages": [{"role": "user", "content": REPEAT}], "temperature": 0}
    calls += [
        ("/v1/chat/completions", {**repeat, "max_tokens": 24}, 200, '"chat.completion"'),
        (
            "/api/chat",
            {**repeat, "stream": False, "options": {"num_predict": 24, "temperature": 0}},
            200,
            '"done":true',
        ),
    ]
    # Errors on every dialect: unknown models (404) and a model whose file is missing (503).
    calls += [
        ("/v1/chat/completions", {"model": "no-such-model", "messages": chat}, 404, "no-such-model"),
        ("/v1/messages", {"model": "no-such-model", "messages": chat, "max_tokens": 4}, 404, "no-such-model"),
        ("/api/chat", {"model": "no-such-model", "messages": chat}, 404, "no-such-model"),
        ("/v1/completions", {"model": "broken", "prompt": "x", "max_tokens": 2}, 503, "missing.gguf"),
    ]
    # A refused Host header (DNS-rebinding defence) is an auth failure; no API keys needed for it.
    assert client.get("/v1/models", headers={"Host": "attacker.example"}).status_code == 403
    for path, body, status, expected in calls:
        resp = client.post(path, json=body)
        assert resp.status_code == status and expected in resp.text.replace('": ', '":'), (
            path,
            body,
            resp.status_code,
            resp.text[:300],
        )


def reload_profile(daemon: Daemon, text: str, successful: bool) -> None:
    """Write the profile file (the daemon watches it) and wait until the reload is reported."""
    before = daemon.get_json("/health")["profile"]["last_reload_at"]
    daemon.profile.write_text(text)

    def applied() -> bool:
        report = daemon.get_json("/health")["profile"]
        return report["last_reload_at"] != before and report["last_reload_successful"] is successful

    wait_for(applied, timeout=20, what=f"reload (successful={successful})")


# ---- the stack --------------------------------------------------------------------------------


def prometheus_config(workdir: Path, target: str) -> Path:
    """The shipped scrape config, pointed at `target`, scraping every second, with the shipped rules."""
    config = yaml.safe_load(asset_text(SCRAPE_CONFIG))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mlx-serve"]
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    rules = workdir / ALERT_RULES
    rules.write_text(asset_text(ALERT_RULES))
    config["rule_files"] = [str(rules)]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, tiny_mlx: Path, smollm2_gguf: Path
) -> Iterator[Stack]:
    prometheus_bin = _require("prometheus")
    workdir = tmp_path_factory.mktemp("observability")
    home = workdir / "home"
    home.mkdir()
    models = {
        "tiny": {"source": str(tiny_gguf), "engine": "llama_cpp", "ttl": "forever"},
        "smol": {
            "source": str(smollm2_gguf),
            "engine": "llama_cpp",
            "ttl": "forever",
            "speculative": {"prompt_lookup": {"max_ngram": 3}},
        },
        "tiny-mlx": {"source": str(tiny_mlx), "engine": "mlx", "ttl": "forever"},
        "broken": {"source": str(home / "missing.gguf"), "engine": "llama_cpp"},
    }
    profile = home / "config.toml"
    profile.write_text(profile_text(models))
    daemon = Daemon(profile, home).start()
    prometheus: subprocess.Popen | None = None
    try:
        # A scrape of a fresh daemon loads nothing.
        fresh = httpx.get(f"{daemon.url}/metrics", timeout=10)
        assert fresh.status_code == 200
        stack = Stack(daemon, "", workdir, fresh.text, statuses(daemon))

        port = free_port()
        stack.prometheus = f"http://127.0.0.1:{port}"
        config = prometheus_config(workdir, f"127.0.0.1:{daemon.port}")
        log = open(workdir / "prometheus.log", "wb")
        prometheus = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

        def ready() -> bool:
            assert prometheus.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                return httpx.get(f"{stack.prometheus}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30, what="prometheus ready")
        wait_scraped_after(stack.prometheus, time.time())

        with httpx.Client(base_url=daemon.url, timeout=120) as client:
            drive(client)
            # An invalid edit (kept out, reported), then a valid one that reloads the MLX model.
            broken = dict(models, **{"tiny-mlx": {**models["tiny-mlx"], "kv_cache": {"bits": 3}}})
            reload_profile(daemon, profile_text(broken), successful=False)
            changed = dict(models, **{"tiny-mlx": {**models["tiny-mlx"], "context_length": 1024}})
            reload_profile(daemon, profile_text(changed), successful=True)
            # Ollama's keep_alive 0 unloads a model by hand.
            assert client.post("/api/generate", json={"model": "tiny", "keep_alive": 0}).status_code == 200
            wait_scraped_after(stack.prometheus, time.time())  # round 1's series exist before round 2
            drive(client)
        wait_scraped_after(stack.prometheus, time.time())
        yield stack
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(20)
            except subprocess.TimeoutExpired:
                prometheus.kill()
        daemon.stop()


# ---- tests ------------------------------------------------------------------------------------


def test_a_scrape_never_loads_a_model(stack: Stack) -> None:
    assert stack.fresh_states and set(stack.fresh_states.values()) == {"unloaded"}, stack.fresh_states
    for model in ("tiny", "tiny-mlx", "smol", "broken"):
        assert sample(stack.fresh_metrics, "mlx_serve_model_loaded", model=model) == 0
    assert "mlx_serve_mlx_memory_bytes" not in stack.fresh_metrics  # MLX not even imported
    assert sample(stack.fresh_metrics, "mlx_serve_model_loads_total") == 0  # exported at 0, unmoved


def test_promtool_check_metrics_is_clean(stack: Stack) -> None:
    exposition = httpx.get(f"{stack.daemon.url}/metrics", timeout=10).text
    for text in (stack.fresh_metrics, exposition):
        result = subprocess.run(
            [_require("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
            result.stdout + result.stderr
        )


def test_the_traffic_moved_the_counters(stack: Stack) -> None:
    text = httpx.get(f"{stack.daemon.url}/metrics", timeout=10).text
    for dialect in ("openai", "anthropic", "ollama"):
        assert sample(text, "mlx_serve_requests_total", dialect=dialect, status="2xx") > 0
        assert sample(text, "mlx_serve_requests_total", dialect=dialect, status="4xx") > 0
        assert sample(text, "mlx_serve_time_to_first_token_seconds_count", dialect=dialect) > 0
    for model in ("tiny", "tiny-mlx"):
        assert sample(text, "mlx_serve_generation_tokens_total", model=model) > 0
        assert sample(text, "mlx_serve_model_loads_total", model=model) == 2  # reloaded in round 2
    assert sample(text, "mlx_serve_prompt_tokens_cached_total", model="tiny") > 0  # prefix reuse
    for kind in ("weights", "kv_cache"):  # loaded models report both parts of their memory
        assert sample(text, "mlx_serve_model_memory_bytes", model="smol", kind=kind) > 0
    assert sample(text, "mlx_serve_speculative_drafted_tokens_total", model="smol") > 0
    assert sample(text, "mlx_serve_speculative_accepted_tokens_total", model="smol") > 0
    assert sample(text, "mlx_serve_model_unloads_total", model="tiny", reason="manual") == 1
    assert sample(text, "mlx_serve_model_unloads_total", model="tiny-mlx", reason="reload") == 1
    assert sample(text, "mlx_serve_model_load_failures_total", model="broken") >= 1
    assert sample(text, "mlx_serve_config_reloads_total", result="failure") == 1
    assert sample(text, "mlx_serve_config_reloads_total", result="success") == 1
    assert sample(text, "mlx_serve_config_last_reload_successful") == 1
    assert sample(text, "mlx_serve_auth_failures_total", reason="host") == 2
    assert sample(text, "mlx_serve_mlx_memory_bytes", kind="active") > 0


# Queries that are rightly all zero after this traffic: nothing is queued or running once it is
# done, and no key has a rate limit.
ZERO_IS_RIGHT = {"Queue and in flight [A]", "Queue and in flight [B]", "Auth failures and rate limits [B]"}


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    dashboard = json.loads(asset_text(DASHBOARD))
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 30
    empty, no_value = [], []
    for where, expr in expressions:
        result = prom_query(stack.prometheus, substitute(expr))
        values = [float(r["value"][1]) for r in result]
        if not result:
            empty.append(f"{where}: {expr}")
        elif where not in ZERO_IS_RIGHT and not any(v > 0 and math.isfinite(v) for v in values):
            no_value.append(f"{where}: {expr} -> {values}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    # Beyond non-empty: the two traffic rounds give every panel a real value (not only 0 or NaN),
    # so one-off events (a load failure, an unload) show in increase() too.
    assert not no_value, "queries with no positive value:\n" + "\n".join(no_value)


def test_dashboard_variables_and_datasource(stack: Stack) -> None:
    dashboard = json.loads(asset_text(DASHBOARD))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    model = variables["model"]
    assert model["includeAll"] and model["multi"] and model["allValue"] == ALL_MODELS
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", model["query"]["query"])
    assert match, model["query"]
    resp = httpx.get(
        f"{stack.prometheus}/api/v1/label/{match[2]}/values", params={"match[]": match[1]}, timeout=10
    )
    assert set(resp.json()["data"]) == {"tiny", "tiny-mlx", "smol", "broken"}

    def panels(items: list[dict]) -> Iterator[dict]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_alert_rules_pass_promtool_and_load_in_prometheus(stack: Stack) -> None:
    rules = stack.workdir / ALERT_RULES
    result = subprocess.run(
        [_require("promtool"), "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert {"MlxServeTimeToFirstTokenHigh", "MlxServeMemoryNearBudget", "MlxServeProfileReloadFailing",
            "MlxServeModelLoadFailures", "MlxServeEvictionChurn"} <= set(loaded)  # fmt: skip
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # The real daemon had a load failure a moment ago: that alert is active now.
    assert loaded["MlxServeModelLoadFailures"]["state"] in ("pending", "firing")
    assert loaded["MlxServeProfileReloadFailing"]["state"] == "inactive"  # the last reload worked


ALERT_UNIT_TEST = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # instance "bad" has every problem, instance "ok" none
      - {{series: 'up{{job="mlx-serve",instance="bad"}}', values: '1x5 0x25'}}
      - {{series: 'up{{job="mlx-serve",instance="ok"}}', values: '1x30'}}
      - {{series: 'mlx_serve_config_last_reload_successful{{job="mlx-serve",instance="bad"}}', values: '1 0x29'}}
      - {{series: 'mlx_serve_config_last_reload_successful{{job="mlx-serve",instance="ok"}}', values: '1x30'}}
      - {{series: 'mlx_serve_models_memory_bytes{{job="mlx-serve",instance="bad"}}', values: '95x30'}}
      - {{series: 'mlx_serve_models_memory_bytes{{job="mlx-serve",instance="ok"}}', values: '50x30'}}
      - {{series: 'mlx_serve_process_resident_memory_bytes{{job="mlx-serve",instance="bad"}}', values: '120x30'}}
      - {{series: 'mlx_serve_process_resident_memory_bytes{{job="mlx-serve",instance="ok"}}', values: '60x30'}}
      - {{series: 'mlx_serve_memory_budget_bytes{{job="mlx-serve",instance="bad"}}', values: '100x30'}}
      - {{series: 'mlx_serve_memory_budget_bytes{{job="mlx-serve",instance="ok"}}', values: '100x30'}}
      - {{series: 'mlx_serve_model_load_failures_total{{job="mlx-serve",instance="bad",model="m"}}', values: '0x15 1x15'}}
      - {{series: 'mlx_serve_model_load_failures_total{{job="mlx-serve",instance="ok",model="m"}}', values: '1x30'}}
      - {{series: 'mlx_serve_model_unloads_total{{job="mlx-serve",instance="bad",model="m",reason="pressure"}}', values: '0+1x30'}}
      - {{series: 'mlx_serve_model_unloads_total{{job="mlx-serve",instance="ok",model="m",reason="ttl"}}', values: '0+1x30'}}
      - {{series: 'mlx_serve_time_to_first_token_seconds_bucket{{job="mlx-serve",instance="bad",model="m",le="1"}}', values: '0x30'}}
      - {{series: 'mlx_serve_time_to_first_token_seconds_bucket{{job="mlx-serve",instance="bad",model="m",le="20"}}', values: '0+10x30'}}
      - {{series: 'mlx_serve_time_to_first_token_seconds_bucket{{job="mlx-serve",instance="bad",model="m",le="+Inf"}}', values: '0+10x30'}}
      - {{series: 'mlx_serve_time_to_first_token_seconds_bucket{{job="mlx-serve",instance="ok",model="m",le="1"}}', values: '0+10x30'}}
      - {{series: 'mlx_serve_time_to_first_token_seconds_bucket{{job="mlx-serve",instance="ok",model="m",le="20"}}', values: '0+10x30'}}
      - {{series: 'mlx_serve_time_to_first_token_seconds_bucket{{job="mlx-serve",instance="ok",model="m",le="+Inf"}}', values: '0+10x30'}}
    promql_expr_test:
      - expr: count by (alertname, instance) (ALERTS{{alertstate="firing"}})
        eval_time: 20m
        exp_samples:
{expected}
"""
FIRING = (
    "MlxServeDown",
    "MlxServeTimeToFirstTokenHigh",
    "MlxServeMemoryNearBudget",
    "MlxServeProcessOverBudget",
    "MlxServeProfileReloadFailing",
    "MlxServeModelLoadFailures",
    "MlxServeEvictionChurn",
)


def test_every_alert_fires_on_its_problem_and_only_then(tmp_path: Path) -> None:
    rules = tmp_path / ALERT_RULES
    rules.write_text(asset_text(ALERT_RULES))
    expected = "\n".join(
        f'          - {{labels: \'{{alertname="{name}",instance="bad"}}\', value: 1}}' for name in FIRING
    )
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(ALERT_UNIT_TEST.format(rules=rules, expected=expected))
    result = subprocess.run(
        [_require("promtool"), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = {r["alert"] for g in yaml.safe_load(asset_text(ALERT_RULES))["groups"] for r in g["rules"]}
    assert shipped == set(FIRING)


def test_unknown_model_names_add_no_series(stack: Stack) -> None:
    url = stack.daemon.url
    chat = [{"role": "user", "content": "hi"}]
    requests = [
        lambda c, name: c.post("/v1/chat/completions", json={"model": name, "messages": chat}),
        lambda c, name: c.post("/v1/completions", json={"model": name, "prompt": "hi"}),
        lambda c, name: c.get(f"/v1/models/{name}"),
        lambda c, name: c.post("/v1/messages", json={"model": name, "messages": chat, "max_tokens": 4}),
        lambda c, name: c.post("/api/chat", json={"model": name, "messages": chat}),
        lambda c, name: c.post("/api/generate", json={"model": name, "prompt": "hi"}),
        lambda c, name: c.post("/api/show", json={"model": name}),
        lambda c, name: c.post(f"/v1/{name}", json={}),  # no such route
    ]
    with httpx.Client(base_url=url, timeout=30) as client:
        for send in requests:  # every (dialect, endpoint, 4xx) series exists before the snapshot
            assert send(client, "warm-up-name").status_code == 404
        before = series_of(client.get("/metrics").text)
        for i in range(1000):
            name = f"{secrets.token_hex(4)}-{i}" + (":latest" if i % 3 == 0 else "")
            assert requests[i % len(requests)](client, name).status_code == 404
        after = series_of(client.get("/metrics").text)
    assert after - before == set(), sorted(after - before)[:20]
    assert before - after == set()


def test_monitoring_export_writes_the_assets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "monitoring"
    profile = tmp_path / "config.toml"
    profile.write_text(
        profile_text({}, server={"port": 12345}, metrics={"listen": "0.0.0.0:9464", "path": "/m"})
    )
    assert cli_main(["monitoring", "export", str(out), "--profile", str(profile)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(ASSETS)
    assert json.loads((out / DASHBOARD).read_text()) == json.loads(asset_text(DASHBOARD))
    assert (out / ALERT_RULES).read_text() == asset_text(ALERT_RULES)
    (job,) = yaml.safe_load((out / SCRAPE_CONFIG).read_text())["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9464"]}] and job["metrics_path"] == "/m"
    check = subprocess.run(
        [_require("promtool"), "check", "config", str(out / SCRAPE_CONFIG)], capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    (out / ALERT_RULES).write_text("# edited by the user\n")
    assert cli_main(["monitoring", "export", str(out), "--profile", str(profile)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / ALERT_RULES).read_text() == "# edited by the user\n"  # refused: nothing overwritten
    assert (
        cli_main(
            [
                "monitoring",
                "export",
                str(out),
                "--force",
                "--target",
                "127.0.0.1:11435",
                "--profile",
                str(profile),
            ]
        )
        == 0
    )
    assert (out / ALERT_RULES).read_text() == asset_text(ALERT_RULES)
    (job,) = yaml.safe_load((out / SCRAPE_CONFIG).read_text())["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:11435"]}]
