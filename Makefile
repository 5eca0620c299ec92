# Two entry points (see README): `make demo` runs the example DAG end to end on throwaway
# PostgreSQL servers; `make test` runs lint, type checks and the whole test suite.
# Both create .venv and install everything themselves, so they work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv postgres clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Throwaway test servers come from testcontainers where a Docker engine answers, otherwise
# from the local PostgreSQL binaries: install them when neither is there.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || docker info >/dev/null 2>&1; then :; \
	else echo "installing PostgreSQL server binaries"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi

demo: $(STAMP) postgres
	$(BIN)/python -m airflow_copyman.demo

lint: $(STAMP)
	$(BIN)/ruff check airflow_copyman tests example_dags bench
	$(BIN)/mypy

test: $(STAMP) postgres lint
	$(BIN)/pytest

bench: $(STAMP) postgres
	$(BIN)/python bench/bench_copy.py

clean:
	rm -rf $(VENV) .demo bench/.work
