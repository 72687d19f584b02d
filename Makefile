# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs the project
# into it the first time (and again when pyproject.toml changes); later runs skip straight to the work.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install demo test test-all test-min lint benchmark

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev,interop]'
	touch $@

demo: $(INSTALLED)
	$(PYTHON) -m lit_wuerstchen.demo

test: $(INSTALLED)
	HF_HUB_OFFLINE=1 LIT_WUERSTCHEN_OFFLINE=1 $(PYTHON) -m pytest

test-all: $(INSTALLED)
	HF_HUB_OFFLINE=1 LIT_WUERSTCHEN_OFFLINE=1 $(PYTHON) -m pytest -m ''

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmark: $(INSTALLED)
	$(PYTHON) benchmarks/loader_throughput.py

# The fast tests with every runtime dependency at its floor in pyproject.toml (.ci/min_constraints.py; torch and
# torchvision excepted), in their own .venv-min: a floor that is too low fails here, not on a user's machine.
VENV_MIN := .venv-min
test-min: $(VENV_MIN)/.installed
	HF_HUB_OFFLINE=1 LIT_WUERSTCHEN_OFFLINE=1 $(VENV_MIN)/bin/python -m pytest -q -p no:cacheprovider

$(VENV_MIN)/.installed: pyproject.toml .ci/min_constraints.py
	test -x $(VENV_MIN)/bin/python || python3 -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	python3 .ci/min_constraints.py > $(VENV_MIN)/constraints.txt
	$(VENV_MIN)/bin/python -m pip install --quiet -e '.[dev]' -c $(VENV_MIN)/constraints.txt
	touch $@
