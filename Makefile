# Every target bootstraps what it needs: a fresh clone runs `make dev` or `make test` directly.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
PROTOS := $(shell find protos -name '*.proto')
PROTO_STAMP := offload/v1/.generated

.PHONY: help install protos dev compute gateway test test-fast bench bench-quick lock clean

help:
	@echo "make dev          start compute + gateway on http://127.0.0.1:8000, restarted when their code changes"
	@echo "make test         run the test suite (bootstraps .venv, generates protos)"
	@echo "make bench        full benchmark vs the naive designs (~9 min), report in bench/results/"
	@echo "make bench-quick  the same, small (~2 min)"
	@echo "make protos       regenerate offload/v1 from protos/"
	@echo "make compute      run compute alone;  make gateway: run the gateway alone"

install: $(VENV)/.installed

# The venv is rebuilt when the lock changes. uv installs the pinned set in seconds.
$(VENV)/.installed: requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --python $(PY) -r requirements.lock
	touch $@

protos: $(PROTO_STAMP)

# One generator, pinned with the runtime (offload/protogen.py: grpcio-tools plus the proto
# comments the OpenAPI document shows). Output lands in the `offload` package as
# offload/v1/*_pb2.py, importable as `offload.v1.compute_pb2` with no path tricks.
$(PROTO_STAMP): $(PROTOS) offload/protogen.py $(VENV)/.installed
	rm -rf offload/v1 offload/testing buf
	$(PY) -m offload.protogen protos --out .
	touch $@

# .env is exported to every process by python-dotenv, the parser pydantic-settings uses, so
# a value means the same under make dev as to compute alone; the real environment wins
# (--no-override); honcho's shell-style parser, which strips the quotes of JSON values, is not
# used. PYTHONPATH and other non-offload variables in .env work too.
# make dev runs offload/devserver.py (the Procfile's two commands, restarted on edits and crashes).
# OFFLOAD_ENV_FILE names another file; set but empty, none (as the settings read it).
ENV_FILE := $(if $(filter undefined,$(origin OFFLOAD_ENV_FILE)),.env,$(OFFLOAD_ENV_FILE))
WITH_DOTENV = $(if $(and $(ENV_FILE),$(wildcard $(ENV_FILE))),$(VENV)/bin/dotenv -f $(ENV_FILE) run --no-override --)

# make dev is for people: console logs (the devserver pipes their stderr, so `auto` would choose JSON),
# coloured when make's own output is a terminal (FORCE_COLOR; NO_COLOR turns colours off). A
# LOG_FORMAT from the environment or .env wins: the defaults are applied after .env is read.
# The Procfile, the production entry, stays as it is: `auto` there.
DEV_LOG_FORMAT = bash -c 'export OFFLOAD_COMPUTE_LOG_FORMAT="$${OFFLOAD_COMPUTE_LOG_FORMAT:-console}" \
	OFFLOAD_GATEWAY_LOG_FORMAT="$${OFFLOAD_GATEWAY_LOG_FORMAT:-console}"; exec "$$@"' dev-log-format

dev: install protos
	if [ -t 1 ]; then export FORCE_COLOR="$${FORCE_COLOR:-1}"; fi; \
	$(WITH_DOTENV) $(DEV_LOG_FORMAT) $(PY) -m offload.devserver

compute: install protos
	$(WITH_DOTENV) $(PY) -m compute

gateway: install protos
	$(WITH_DOTENV) $(PY) -m gateway

test: install protos
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install protos
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: install protos
	$(PY) -m bench --quick $(BENCH_ARGS)

# Re-pin after editing pyproject.toml dependencies.
lock: install
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --extra bench --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) offload/v1 offload/testing buf .pytest_cache
