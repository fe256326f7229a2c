# issc: `make demo` runs the main job, `make test` runs every check. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint unit e2e bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: lint $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider --durations=10

lint: $(STAMP)
	$(BIN)/ruff check issc hub node tests examples bench
	$(BIN)/mypy --strict issc hub node

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e

# The peer (Dask) that the benchmarks compare against; installed once, beside the dev tools.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/store_commit.py
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/relay.py

# The long chaos run of docs/reliability.md (about 10 minutes); `make test` runs a short one.
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py --tasks 5000 --duration 420 --drain 240 --seed 7

clean:
	rm -rf $(VENV) demo-run *.egg-info .pytest_cache .mypy_cache .ruff_cache
