# kdjax: `make demo` runs the main example, `make test` runs the test suite, `make docs` builds the
# documentation. Each creates .venv on first use and installs what it needs into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: demo test bench docs lint typecheck compile-gpu compile-tpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.examples: pyproject.toml | $(PY)
	$(PIP) install -e ".[examples]"
	touch $@

$(VENV)/.test: pyproject.toml | $(PY)
	$(PIP) install -e ".[test]"
	touch $@

$(VENV)/.docs: pyproject.toml | $(PY)
	$(PIP) install -e ".[docs]"
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) install -e ".[dev]"
	touch $@

demo: $(VENV)/.examples
	$(PY) examples/distill_lm.py

test: $(VENV)/.test
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) benchmarks/bench_kd_loss.py
	$(PY) benchmarks/bench_kd_loss.py --quick --divergences
	$(PY) benchmarks/bench_fused.py
	$(PY) benchmarks/bench_sparse.py
	$(PY) benchmarks/bench_sharded.py
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_compile.py
	$(PY) benchmarks/bench_metrics.py

# Warnings are errors. The API pages are generated afresh, so a removed name leaves no stale page.
docs: $(VENV)/.docs
	rm -rf docs/_autosummary
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(VENV)/.dev
	$(PY) -m ruff check kdjax tests examples benchmarks

typecheck: $(VENV)/.dev
	$(PY) -m mypy

# The kernels compiled for GPUs (H100, H200) and TPUs (v5e, v5p, v6e) without either: each installs
# its toolchain once outside the checkout (see .ci/compile_gpu). ARGS go to the script; without
# them, the CI subset.
compile-gpu:
	bash .ci/compile_gpu $(ARGS)

compile-tpu:
	bash .ci/compile_tpu $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache docs/_build docs/_autosummary
