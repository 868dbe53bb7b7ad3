# `make demo` and `make test` each work on a fresh machine: they create .venv and install what they need, all of
# it declared in pyproject.toml (the runtime, and the extras test, lint, paddlenlp, paddleformers).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-fast lint install clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -q -e '.[test]'
	touch $@

$(VENV)/.lint: $(VENV)/.test
	$(PIP) install -q -e '.[lint]'
	touch $@

install: $(VENV)/.core

demo: $(VENV)/.core
	$(PY) -m paddle_glm4 demo

test: $(VENV)/.test
	$(PY) -m pytest -q
	$(MAKE) test-paddlenlp
	$(MAKE) test-paddleformers

# everything but the tests marked slow (full GLM-4 width, CLIs and servers in subprocesses, the quick benchmark)
test-fast: $(VENV)/.test
	$(PY) -m pytest -q -m "not slow"

# ruff's lint rules and formatting over the whole project (the README's Python blocks too), and mypy, as
# configured in pyproject.toml (mypy: paddle_glm4/ and converters/)
lint: $(VENV)/.lint
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache
	rm -rf $(PADDLENLP_VENV) $(PADDLEFORMERS_VENV)

# An integration's venv: $(1) its directory, $(2) the extra that installs the library (with test-runner, and
# finetune: `glm4 finetune --trainer` runs there)
define integration_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -e '.[$(2),finetune,test-runner]'
	touch $(1)/.installed
endef

# The PaddleNLP integration's tests, in a venv of their own: PaddleNLP's pins (numpy<2, ...) clash with .venv's.
.PHONY: test-paddlenlp
PADDLENLP_VENV ?= .venv-paddlenlp
PADDLENLP_PY := $(PADDLENLP_VENV)/bin/python

$(PADDLENLP_VENV)/.installed: pyproject.toml
	$(call integration_venv,$(PADDLENLP_VENV),paddlenlp)

# Besides the integration, the tests marked torch_free of these modules run there too: that venv has numpy 1.x
# (a supported environment) and no torch, like a PaddleNLP user's.
TORCH_FREE_TESTS ?= tests/test_converter.py tests/adversarial/test_paths_and_links.py \
	tests/adversarial/test_deletion.py tests/adversarial/test_partials.py tests/adversarial/test_resource_limits.py

test-paddlenlp: $(PADDLENLP_VENV)/.installed
	$(PADDLENLP_PY) -m pytest -q tests/test_paddlenlp.py tests/test_finetune.py
	$(PADDLENLP_PY) -m pytest -q -m torch_free $(TORCH_FREE_TESTS)

# The PaddleFormers integration's tests, in a venv of their own: PaddleFormers pins transformers<5.4 (.venv has the
# reference's 5.24) and datasets>=3 (.venv-paddlenlp has datasets<3). test_finetune.py runs in both: `glm4 finetune
# --trainer paddlenlp|paddleformers` there.
.PHONY: test-paddleformers
PADDLEFORMERS_VENV ?= .venv-paddleformers
PADDLEFORMERS_PY := $(PADDLEFORMERS_VENV)/bin/python

$(PADDLEFORMERS_VENV)/.installed: pyproject.toml
	$(call integration_venv,$(PADDLEFORMERS_VENV),paddleformers)

test-paddleformers: $(PADDLEFORMERS_VENV)/.installed
	$(PADDLEFORMERS_PY) -m pytest -q tests/test_paddleformers.py tests/test_finetune.py
