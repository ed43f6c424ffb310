# Two commands on a fresh machine:
#   make run    install into .venv and run the main job (`gpusc run`)
#   make test   install into .venv and run the test suite
#   make docs   build the docs site into docs/_build/html (warnings are errors)
#   make notebooks  execute notebooks/*.ipynb and store their outputs (the docs render them)
# Override the interpreter with `make PYTHON=/path/to/python3.12 test`.
# On a machine with a GPU:
#   make test-gpu   also install CuPy and RMM (GPU_EXTRA=cu13, or cu12 for CUDA 12) and run
#                   the GPU-marked tests; fails when no device is usable (GPUSC_REQUIRE_GPU=1)

SHELL := /bin/bash
VENV  := .venv
STAMP := $(VENV)/.installed

# Real datasets for the tests; conftest.py reads $GPUSC_DATA.
GPUSC_DATA ?= $(abspath ../shared/data)
export GPUSC_DATA

# Python 3.12 preferred: `python3.12` on PATH, else pyenv's newest 3.12.x (pyenv shims
# refuse python3.12 unless PYENV_VERSION selects it), else python3 when it is >= 3.11.
# Prints the absolute interpreter path so the venv does not depend on pyenv's shims.
define find_python
for c in "python3.12" \
         "env PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | tail -n1) python3.12" \
         "python3"; do \
  $$c -c 'import sys; assert sys.version_info >= (3, 11); print(sys.executable)' 2>/dev/null && break; \
done
endef

ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell $(find_python))
endif

GPU_EXTRA ?= cu13
GPU_STAMP := $(VENV)/.installed-$(GPU_EXTRA)

.PHONY: venv run test test-gpu docs notebooks clean

venv: $(STAMP)

$(VENV)/bin/python:
	@if [ -z "$(PYTHON)" ]; then \
	  echo "No Python >= 3.11 found (tried python3.12, pyenv 3.12, python3); run: make PYTHON=/path/to/python3.12 $(MAKECMDGOALS)" >&2; \
	  exit 1; \
	fi
	@echo "creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when pyproject.toml changes; the editable install picks up source edits.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --progress-bar off -e '.[test,bench,docs]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/gpusc run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

$(GPU_STAMP): pyproject.toml $(STAMP)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --progress-bar off -e '.[test,bench,$(GPU_EXTRA)]'
	touch $@

test-gpu: $(GPU_STAMP)
	GPUSC_REQUIRE_GPU=1 $(VENV)/bin/python -m pytest -q -m gpu

# tests/test_docs.py runs the same build into a temporary folder.
docs: $(STAMP)
	$(VENV)/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

# Reads pbmc3k from $$GPUSC_DATA (else scanpy downloads it); tests/test_notebooks.py runs them too.
notebooks: $(STAMP)
	cd notebooks && for nb in *.ipynb; do ../$(VENV)/bin/jupyter-execute --inplace --timeout=600 "$$nb" || exit 1; done

clean:
	rm -rf $(VENV) docs/_build docs/generated
