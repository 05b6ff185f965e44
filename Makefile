# `make demo` and `make test` work on a fresh machine with only Python 3.11+ and
# the package registries: every dependency is installed here, into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= test,dev,tensorflow,onnxruntime

.PHONY: venv test demo lint typecheck bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m deploy.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy tunnel edge_proxy worker_agent inference loadtest

clean:
	rm -rf $(VENV) .demo .pytest_cache
