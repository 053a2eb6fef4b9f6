# Two entry points, each doing all set-up on a fresh machine (Python 3.11, no GPU):
#   make demo   - trains a small MLP on scikit-learn's digits and attributes test predictions
#   make test   - runs the default test suite (under ~10 minutes on 2 cores)
#   make lint   - ruff and mypy
# Both install the exact versions of requirements-lock.txt (the ones the test suite last passed
# with), so a new release of a dependency cannot turn a fresh clone red. pyproject.toml keeps the
# version ranges that library users get. `make lock` moves the lock to the newest releases.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-lock.txt
# The CPU build of torch on local disk; pinned here so no multi-GB CUDA build is pulled.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint lock bench docs
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_PIN)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/source-proj demo

test: install
	$(PY) -m pytest -q -m "not slow"

# The linter and the type checker (settings in pyproject.toml); CI runs them before the tests.
lint: install
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy

# The documentation site (docs/, mkdocs.yml) into site/; --strict turns every warning (a broken
# link, a docstring that does not match its signature) into a failure.
docs: install
	$(PY) -m pip install -q -c $(LOCK) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# A fresh environment with the newest release of every dependency that pyproject's ranges admit
# (torch stays pinned to the local CPU build); the lock is rewritten only if the suite and the
# documentation build pass.
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q --upgrade -e ".[test,docs]" "$(TORCH_PIN)"
	$(PY) -m pytest -q -m "not slow"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	{ echo "# Exact versions the test suite passed with (make lock, $$(date -u +%F), Python $$($(PY) -c 'import platform; print(platform.python_version())'))."; \
	  echo "# make install uses it as a pip constraints file; pyproject.toml keeps the ranges."; \
	  $(PY) -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	touch $(VENV)/.installed

# The benchmarks of benchmarks/ (CPU parts); TRAK's package for the external reference.
bench: install
	$(PY) -m pip install -q --no-deps "traker==0.3.2"
	$(PY) benchmarks/lds.py
	$(PY) benchmarks/projection.py
	$(PY) benchmarks/featurize.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/curation.py
	$(PY) benchmarks/integrity.py
