# Two entry points, each doing all set-up on a fresh machine (Python 3.11, no GPU):
#   make demo   - trains a small MLP on scikit-learn's digits and attributes test predictions
#   make test   - runs the default test suite (under ~10 minutes on 2 cores)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on local disk; pinned here so no multi-GB CUDA build is pulled.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_PIN)"
	touch $@

demo: install
	$(VENV)/bin/source-proj demo

test: install
	$(PY) -m pytest -q -m "not slow"

# The benchmarks of benchmarks/ (CPU parts); TRAK's package for the external reference.
bench: install
	$(PY) -m pip install -q --no-deps "traker==0.3.2"
	$(PY) benchmarks/lds.py
	$(PY) benchmarks/projection.py
	$(PY) benchmarks/featurize.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/curation.py
	$(PY) benchmarks/integrity.py
