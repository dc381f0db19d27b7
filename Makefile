# The two README commands. Each creates .venv when missing and installs the package into it.
# torch is pinned here (not in setup.cfg) so that CI and fresh machines take the CPU wheel on disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed-torch: $(PY)
	$(PY) -m pip install -q $(TORCH_PIN)
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed-torch setup.cfg setup.py
	$(PY) -m pip install -q -e ".[demo]" "$(TORCH_PIN)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-torch setup.cfg setup.py
	$(PY) -m pip install -q -e ".[test,demo]" "$(TORCH_PIN)"
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) scripts/demo.py

# `make test` skips the tests marked slow and runs the rest on two worker processes (pytest-xdist,
# one test file per worker at a time);
# CI runs everything, also on two workers, with `make test PYTEST_SELECT="-n 2 --dist loadfile"` (see .ci/run). Select others
# with e.g. PYTEST_SELECT='-m transformers'.
PYTEST_SELECT ?= -m "not slow" -n 2 --dist loadfile

test: $(VENV)/.installed-test
	$(PY) -m mypy patch_backend
	$(PY) -m pytest $(PYTEST_SELECT)

bench: $(VENV)/.installed-test
	$(PY) scripts/bench_patching.py --json out/bench_patching.json
	$(PY) scripts/bench_sweep.py --json out/bench_sweep.json

clean:
	rm -rf $(VENV) build *.egg-info
