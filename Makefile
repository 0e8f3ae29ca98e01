# Two entry points for a fresh machine: `make demo` (fit the astronaut photograph) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) tools/demo.py --output demo_output

bench: $(STAMP)
	$(PY) tools/bench_forward.py
	$(PY) tools/bench_fit.py
	$(PY) tools/bench_render.py
	$(PY) tools/bench_preprocess.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
