# Two entry points for a fresh machine: `make demo` (fit the astronaut photograph) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench mutation clean

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

# Re-make issue 13's wrong changes one at a time; each must fail its tests (docs/TESTING.md).
# On demand only, not in CI: about 15 minutes on 2 cores.
mutation: $(STAMP)
	$(PY) tools/mutation_check.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
