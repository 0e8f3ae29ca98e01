# Two entry points for a fresh machine: `make demo` (fit the astronaut photograph) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-slow test-device device-check test-ray demo bench mutation mutation-sample clean

install: $(STAMP)

# The `ray` extra too: the Ray engine's tests run with the rest (CI fails them without Ray).
# The Makefile is a prerequisite so that a venv made by an older install step is completed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,ray]"
	touch $(STAMP)

# Two tiers (tests/conftest.py lists them; docs/TESTING.md): the fast one first, so a change
# learns of its first failure within minutes. A worker that dies ends the run (no restart: a
# restarted worker once waited forever on the dead one's Ray cluster).
PYTEST := $(PY) -m pytest -q -n 2 --max-worker-restart 0 $(PYTEST_ARGS)
test: $(STAMP)
	$(PYTEST) -m "not slow"
	$(PYTEST) -m slow --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow --dist loadfile --no-loadscope-reorder

# The numerical suites (forward model, renderer, fits) with the machine's own python, for an
# accelerator or any bare image with JAX, NumPy, SciPy, optax, flax, absl-py and pytest: no
# MediaPipe, OpenCV or trimesh, no venv. The suites are listed in tests/conftest.py.
DEVICE_PYTHON ?= python3
test-device:
	PYTHONPATH=. $(DEVICE_PYTHON) -m pytest -q -p no:cacheprovider -m device

# Device tests + fit and render benchmarks as JSON under $(OUT) (~8 min on an H100; QUICK=1 for
# small settings on a CPU). See docs/BENCHMARKS.md.
OUT ?= device_check_out
device-check:
	OUT=$(OUT) PYTHON=$(DEVICE_PYTHON) bash tools/device_check.sh

# The Ray engine's tests alone (`make test` runs them too), on a local two-node Ray cluster.
test-ray: $(STAMP)
	$(PY) -m pytest -q tests/test_ray_engine.py

demo: $(STAMP)
	$(PY) tools/demo.py --output demo_output

bench: $(STAMP)
	$(PY) tools/bench_forward.py
	$(PY) tools/bench_fit.py
	$(PY) tools/bench_render.py
	$(PY) tools/bench_preprocess.py

# Re-make issue 13's wrong changes one at a time; each must fail its tests (docs/TESTING.md).
# On demand only, not in CI: about 15 minutes on 2 cores.
mutation: $(STAMP)
	$(PY) tools/mutation_check.py

# Sampled mutation testing with mutmut's operators (docs/TESTING.md): mutates files of this
# checkout one at a time (each restored after its run), so leave the tree alone while it runs,
# or run it in a `git worktree`. On demand only: one to two hours on 2 cores.
mutation-sample: $(STAMP)
	$(PY) -m pip install -q mutmut==2.5.1
	PYTHONPATH=$(CURDIR) $(PY) tools/mutation_sample.py --output mutation_sample.jsonl

clean:
	rm -rf $(VENV) demo_output .pytest_cache
