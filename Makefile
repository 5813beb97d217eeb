# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean bench evidence

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: on these machines torch==2.13.0 is a local CPU wheel, while an unpinned
# torch pulls several GB of CUDA packages. pyproject keeps the range open for users.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest tests

demo: install
	$(BIN)/python -m fixtures.demo

# the paper's table in miniature (docs/results.md): pretrains a pair on the Python stdlib's docstrings once
# (cached in benchmarks/.work/pairs), then runs every condition through the CLI
evidence: install
	$(BIN)/python -m benchmarks.evidence.run

clean:
	rm -rf $(VENV) .fixtures
