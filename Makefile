# `make test` and `make demo` work on a fresh machine: they create .venv and install
# everything first. torch 2.13.0 (a CPU build on this kind of machine) is installed
# before the project so that `torch>=2.4` is already met and no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION ?= 2.13.0

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

# Shards the standard library's sources, pretrains with DeepSpeed on 2 ranks (pp = 2),
# evaluates, generates and plots the loss curve into runs/demo/.
demo: install
	$(PIP) install -e ".[plot]"
	$(PY) -m megatrain.demo

clean:
	rm -rf $(VENV) build *.egg-info
