# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint fmt bench clean browser reliability

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,load]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/orderq up

# The dashboard's browser test drives Debian's chromium (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "make: chromium not installed; tests/test_dashboard_browser.py will skip"

test: $(VENV)/.installed-test browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not long"

# The long version of the fault and hostile-input tests (longer loads, more kills); the
# figures of each fault go to test-artifacts/reliability-report.jsonl (see RELIABILITY.md).
reliability: $(VENV)/.installed-test
	mkdir -p test-artifacts && rm -f test-artifacts/reliability-report.jsonl
	ORDERQ_RELIABILITY_LONG=1 ORDERQ_RELIABILITY_OUT=test-artifacts/reliability-report.jsonl $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_faults.py tests/test_hostile_input.py
	$(BIN)/python -m pytest -q -m long tests/test_cluster.py tests/test_loadtest.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed-test
	$(BIN)/orderq bench --reference --spike --json bench-report.json

clean:
	rm -rf $(VENV) .orderq *.egg-info
