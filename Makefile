# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test typecheck lint fmt bench clean browser prometheus jemalloc reliability

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,load]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed jemalloc
	$(BIN)/orderq up

# The embedded Valkey and the stages run on jemalloc when the system has it (ORDERQ_MALLOC,
# README "Environment"): Debian's libjemalloc2, installed when we may; without it, glibc's malloc.
jemalloc:
	@ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 >/dev/null; } || echo "make: libjemalloc2 not installed; orderq runs on glibc's malloc"

# The dashboard's browser test drives Debian's chromium (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "make: chromium not installed; tests/test_dashboard_browser.py will skip"

# promtool and prometheus (deploy/prometheus rules, tests/test_prometheus_rules.py) come from
# Debian's prometheus package; without its recommends (no node exporter service).
prometheus:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || echo "make: prometheus not installed; tests/test_prometheus_rules.py will skip"

test: $(VENV)/.installed-test browser prometheus jemalloc
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# The type check (one core, ~1 min on a fresh clone) runs beside the tests, which keep about
	@# one of this machine's two cores busy; its report is printed after theirs, and either fails make.
	@out=$$(mktemp); $(BIN)/mypy > $$out 2>&1 & mypy=$$!; \
	$(BIN)/python -m pytest -q -m "not long"; tests=$$?; \
	wait $$mypy; types=$$?; echo "mypy: $$(tail -1 $$out)"; [ $$types -eq 0 ] || cat $$out; rm -f $$out; \
	[ $$tests -eq 0 ] && [ $$types -eq 0 ]

# The long version of the fault and hostile-input tests (longer loads, more kills); the
# figures of each fault go to test-artifacts/reliability-report.jsonl (see RELIABILITY.md).
reliability: $(VENV)/.installed-test
	mkdir -p test-artifacts && rm -f test-artifacts/reliability-report.jsonl
	ORDERQ_RELIABILITY_LONG=1 ORDERQ_RELIABILITY_OUT=test-artifacts/reliability-report.jsonl $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_faults.py tests/test_hostile_input.py
	ORDERQ_RELIABILITY_OUT=test-artifacts/reliability-report.jsonl $(BIN)/python -m pytest -q -m long tests/test_cluster.py tests/test_loadtest.py tests/test_overload.py tests/test_harness.py tests/test_bench_html.py tests/test_connect_platforms.py tests/test_openapi_fuzz.py

# mypy over the service packages, strict ([tool.mypy] in pyproject.toml).
typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# --peers: taskiq (the fastest Python queue measured here) on the same Redis, the bar the
# pipeline's rate is set against; the peers extra installs it.
$(VENV)/.installed-peers: pyproject.toml | $(VENV)/.installed-test
	$(BIN)/python -m pip install -q -e '.[test,load,peers]'
	touch $@

bench: $(VENV)/.installed-peers
	$(BIN)/orderq bench --reference --peers --spike --json bench-report.json

clean:
	rm -rf $(VENV) .orderq *.egg-info
