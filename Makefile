# `make demo` and `make test` work on a fresh machine with only Python 3.11+ and
# the package registries: every dependency is installed here, into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= test,dev,tensorflow,onnxruntime,mlperf

.PHONY: venv weights test demo lint typecheck bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The detection and transformation model files, cut out of registry packages
# (npm @mediapipe/objectron, PyPI mediapipe via pip download --no-deps) and
# hash-checked; a no-op once they are in place (inference/weights.py). A
# failed fetch (no npm, say) does not stop `make test`: the tests that need the
# files skip with one line naming the fix.
weights: $(STAMP)
	-$(BIN)/python -m inference.weights fetch

test: $(STAMP) weights
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP) weights
	$(BIN)/python -m deploy.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy tunnel edge_proxy worker_agent inference loadtest

clean:
	rm -rf $(VENV) .demo .pytest_cache
