# `make demo` and `make test` each work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install clean

$(VENV)/.core: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.core requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.core

demo: $(VENV)/.core
	$(PY) -m paddle_glm4 demo

test: $(VENV)/.test
	$(PY) -m pytest -q
	$(MAKE) test-paddlenlp

clean:
	rm -rf $(VENV) .pytest_cache
	rm -rf $(PADDLENLP_VENV)

# The PaddleNLP integration's tests, in a venv of their own: PaddleNLP's pins (numpy<2, ...) clash with .venv's.
.PHONY: test-paddlenlp
PADDLENLP_VENV ?= .venv-paddlenlp
PADDLENLP_PY := $(PADDLENLP_VENV)/bin/python

$(PADDLENLP_VENV)/.installed: requirements.txt requirements-paddlenlp.txt pyproject.toml
	$(PYTHON) -m venv $(PADDLENLP_VENV)
	$(PADDLENLP_PY) -m pip install -q --upgrade pip
	$(PADDLENLP_PY) -m pip install -q -r requirements-paddlenlp.txt
	touch $@

test-paddlenlp: $(PADDLENLP_VENV)/.installed
	$(PADDLENLP_PY) -m pytest -q tests/test_paddlenlp.py
