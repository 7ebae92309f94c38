# Prism. `make run` and `make test` work on a fresh clone: both create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
LISTEN ?= 127.0.0.1:50051
PYTEST_ARGS ?=

.PHONY: run test test-slow lint typecheck proto proto-check buf-lint bench bench-registry bench-backends bench-queues install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

## Serve the embedded default (SQLite in ./data) on $(LISTEN).
run: $(STAMP)
	$(BIN)/prism-server --listen $(LISTEN)

## The whole suite (unit, conformance, pattern, CLI). Slow suites: `make test-slow`.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

## Regenerate gen/ from proto/.
proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

## Fail when gen/ is not what proto/ generates.
proto-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py >/dev/null 2>&1
	git diff --exit-code --stat -- gen/
	test -z "$$(git status --porcelain --untracked-files=all -- gen/)" || \
		{ echo "gen/ is out of date: run 'make proto' and commit"; git status --short -- gen/; exit 1; }

buf-lint: $(STAMP)
	$(BIN)/buf lint

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy server plugins prismctl

bench: $(STAMP)
	$(BIN)/python -m bench.kv

bench-registry: $(STAMP)
	$(BIN)/python -m bench.registry

bench-backends: $(STAMP)
	$(BIN)/python -m bench.backends

bench-queues: $(STAMP)
	$(BIN)/python -m bench.queues

clean:
	rm -rf $(VENV) build *.egg-info
