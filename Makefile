# sacode: the two commands are `make book` and `make test`; both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NB_SRC := $(sort $(wildcard notebooks/[0-9]*.md))
NB_DIR := _build/ipynb
# jupyter as root (every machine here runs as root) needs allow_root; see .jupyter/
export JUPYTER_CONFIG_PATH := $(CURDIR)/.jupyter
export HF_HUB_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: all venv test unit verify notebooks nbtest book lab handouts clean help

help:
	@echo "make test      unit tests + python -m sacode verify + every chapter in the ci profile (nbval)"
	@echo "make book      execute every chapter (class profile) and build the HTML book in _build/html"
	@echo "make lab       open the chapters in JupyterLab (jupytext opens the .md chapters as notebooks)"
	@echo "make handouts  generated .ipynb chapters without solution cells in _build/handouts"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

unit: $(STAMP)
	$(PY) -m pytest -q tests

verify: $(STAMP)
	$(PY) -m sacode verify

# jupytext -> ipynb (generated, never committed)
notebooks: $(STAMP)
	@mkdir -p $(NB_DIR)
	@for f in $(NB_SRC); do $(VENV)/bin/jupytext --quiet --to ipynb "$$f" -o "$(NB_DIR)/$$(basename "$${f%.md}").ipynb" || exit 1; done

nbtest: notebooks
	SACODE_PROFILE=ci $(PY) -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider $(NB_DIR)

test: unit verify nbtest

book: $(STAMP)
	rm -rf _build/html _build/jupyter_execute _build/.doctrees
	$(VENV)/bin/jupyter-book build . --config book/_config.yml --toc book/_toc.yml -W -n --keep-going --path-output _build/book
	@echo "book: _build/book/_build/html/index.html"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --allow-root notebooks

handouts: notebooks
	$(PY) -m sacode.handouts $(NB_DIR) _build/handouts

clean:
	rm -rf _build runs
