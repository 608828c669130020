# Two commands on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install up down test test-external bench typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# the browser tests drive Debian's Chromium (nothing downloaded by Playwright)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y chromium chromium-driver || { apt-get update && apt-get install -y chromium chromium-driver; }; \
	  else echo "make install: chromium is not installed; as root: apt-get install -y chromium chromium-driver (Debian's packages)" >&2; exit 1; fi; }
	touch $(STAMP)

install: $(STAMP)

## Start the embedded fleet (control plane + 3 shards + Valkey), the router and the host.
up: $(STAMP)
	$(BIN)/tenantfleet up

down: $(STAMP)
	$(BIN)/tenantfleet down

## The whole suite against an embedded fleet the suite starts itself.
test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

## The same suite against the servers named in the environment (defaults: this machine's PG 15 and Redis 7).
test-external: $(STAMP)
	TENANTFLEET_TEST_EXTERNAL_PG=$${TENANTFLEET_TEST_EXTERNAL_PG:-postgresql://postgres@127.0.0.1:5432/postgres} \
	TENANTFLEET_TEST_EXTERNAL_REDIS=$${TENANTFLEET_TEST_EXTERNAL_REDIS:-redis://127.0.0.1:6379/15} \
	$(BIN)/pytest -q -p no:cacheprovider

## Benchmarks (figures, not tests): installs what they need (the bench extra, and wrk), then runs all three.
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y wrk || { apt-get update && apt-get install -y wrk; }; \
	  else echo "make bench: wrk is not installed; as root: apt-get install -y wrk (Debian's package)" >&2; exit 1; fi; }
	$(BIN)/python bench/resolve.py
	$(BIN)/python bench/migrate.py
	$(BIN)/python bench/request_path.py --profile

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .fleet
