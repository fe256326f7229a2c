# issc: `make demo` runs the main job, `make test` runs every check. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit e2e bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,postgres,bench]'
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

# Dask, the peer the benchmarks compare against, comes with the dev tools (the `bench`
# extra): `make test` runs every benchmark once at a tiny size (tests/e2e/test_bench_e2e.py).
bench: $(STAMP)
	$(BIN)/python -m bench.throughput
	$(BIN)/python bench/store_commit.py
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/swarm.py

# The long chaos run of docs/reliability.md (about 10 minutes); `make test` runs a short one.
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py --tasks 5000 --duration 420 --drain 240 --seed 7

clean:
	rm -rf $(VENV) demo-run *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
