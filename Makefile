# Two entry points for a fresh machine: `make demo` (fit the astronaut photograph) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-ray demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# The Ray engine's tests (skipped by `make test` unless Ray is installed): adds the optional
# `ray` extra to the venv, then runs them on a local two-CPU Ray cluster.
test-ray: $(STAMP)
	$(PY) -m pip install -q -e ".[ray,test]"
	$(PY) -m pytest -q tests/test_ray_engine.py

demo: $(STAMP)
	$(PY) tools/demo.py --output demo_output

bench: $(STAMP)
	$(PY) tools/bench_forward.py
	$(PY) tools/bench_fit.py
	$(PY) tools/bench_render.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
