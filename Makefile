# sacode: the two commands are `make book` and `make test`; both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NB_SRC := $(sort $(wildcard notebooks/[0-9]*.md))
NB_DIR := _build/ipynb
BOOK_HTML := _build/book/_build/html/index.html
# jupyter as root (every machine here runs as root) needs allow_root; see .jupyter/
export JUPYTER_CONFIG_PATH := $(CURDIR)/.jupyter
export HF_HUB_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: all venv test unit verify notebooks nbtest book check-book lab handouts time-chapters format-chapters clean help

help:
	@echo "make test           unit tests + python -m sacode verify + every chapter in the ci profile (nbval)"
	@echo "make book           execute every chapter (class profile), build the HTML book in _build/book/_build/html"
	@echo "make check-book     build the book if it is out of date, then test it in a real browser (needs chromium)"
	@echo "make lab            open the chapters in JupyterLab (a double click opens a chapter as a notebook)"
	@echo "make handouts       exercise notebooks in _build/handouts/student and _build/handouts/instructor"
	@echo "make time-chapters  measure how long each chapter takes to run (class profile), print a table"
	@echo "make format-chapters  format the chapters' code cells (ruff) to the book's 88 columns; prose untouched"

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
	rm -rf _build/book   # a clean build: every chapter is executed again, none is taken from the last build
	$(VENV)/bin/jupyter-book build . --config book/_config.yml --toc book/_toc.yml -W -n --keep-going --path-output _build/book
	@echo "book: $(BOOK_HTML)"

# The browser tests (pytest marker `browser`) of the built book and of `make lab`. They need Chromium and its
# driver (Debian: apt-get install chromium chromium-driver) and skip with a message without them.
$(BOOK_HTML): $(NB_SRC) $(wildcard book/*.md book/*.yml book/*.bib book/_static/* figures/*) $(shell find sacode -name "*.py") | $(STAMP)
	$(MAKE) book

check-book: $(BOOK_HTML) | $(STAMP)
	$(PY) -m pytest -q -rs --run-browser tests/test_book_browser.py tests/test_lab.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --allow-root notebooks

handouts: notebooks
	rm -rf _build/handouts
	$(PY) -m sacode.handouts $(NB_DIR) _build/handouts

time-chapters: $(STAMP)
	$(PY) scripts/time_chapters.py

# ruff comes with the `test` extra; only the code cells change, see scripts/format_chapters.py
format-chapters: $(STAMP)
	$(PY) scripts/format_chapters.py

clean:
	rm -rf _build runs
