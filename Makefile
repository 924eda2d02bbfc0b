# tffpipe: every command a user needs. The environment (.venv) is built from the lock
# files on first use and rebuilt only when a lock file, setup.py or the native shim changes.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tffpipe-installed
SHIM   := tffpipe/_native/libloopback_bind.so
ROUNDS ?= 50
RUNS   ?= runs

.PHONY: env train test lint format tensorboard bench bench-quick lock clean

env: $(STAMP) $(SHIM)

$(STAMP): requirements.lock requirements-dev.lock setup.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; tffpipe needs Python 3.11 (TFF 0.87 supports 3.9-3.11). Install it, or run: make PYTHON=/path/to/python3.11"; exit 2; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps --no-cache-dir -r requirements.lock -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# LD_PRELOAD shim that keeps TFF's local worker on the loopback interface (see README, Security).
$(SHIM): tffpipe/_native/loopback_bind.c
	cc -shared -fPIC -O2 -Wall -o $@ $< -ldl

train: env
	$(PY) -m experiments.train --rounds=$(ROUNDS)

# Two pytest processes (pytest-xdist), one per core; tests that share a module's fixture run in
# one of them (tests/conftest.py groups them), so the fixture's run is made once.
test: env
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

lint: env
	$(VENV)/bin/ruff check tffpipe experiments tests benchmarks
	$(VENV)/bin/ruff format --check tffpipe experiments tests benchmarks

format: env
	$(VENV)/bin/ruff format tffpipe experiments tests benchmarks
	$(VENV)/bin/ruff check --fix tffpipe experiments tests benchmarks

tensorboard: env
	$(PY) -m experiments.tensorboard --root=$(RUNS)

bench: env
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.wall --repeats=3
	$(PY) -m benchmarks.workers
	$(PY) -m benchmarks.client_groups

bench-quick: env
	$(PY) -m benchmarks.run --quick
	$(PY) -m benchmarks.wall --workloads=fixed,w2
	$(PY) -m benchmarks.client_groups --rounds=2

# Regenerates the locks (needs network and `uv`); jaxlib is overridden to 0.4.13, see README.
lock:
	printf 'jaxlib==0.4.13\n' > /tmp/tffpipe-override.txt
	uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_31 requirements.in --override /tmp/tffpipe-override.txt -o /tmp/tffpipe-lock.txt
	uv pip compile --python-version 3.11 requirements-dev.in -c /tmp/tffpipe-lock.txt -o /tmp/tffpipe-dev.txt
	@echo "review /tmp/tffpipe-lock.txt and /tmp/tffpipe-dev.txt, then copy them over requirements.lock / requirements-dev.lock"

clean:
	rm -rf $(VENV) $(SHIM)
