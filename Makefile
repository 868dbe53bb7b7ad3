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

clean:
	rm -rf $(VENV) .pytest_cache
