# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# The CPU build. GPU users: install a CUDA build of torch into $(VENV) first; it is kept.
TORCH ?= torch==2.13.0
CORES ?= 2
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=
# Run the workflow with the venv's python first on PATH, so `script:` stages import mmke.
RUN := PATH="$(BIN):$$PATH"

.PHONY: demo test test-fast lint dry-run clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

# A killed run's lock is removed first, unless a Snakemake still runs here (mmke.unlock); its
# half-done jobs are rerun by rerun-incomplete (profiles/default, Snakemake's default workflow profile).
demo: $(VENV)/.installed
	$(RUN) python -m mmke.unlock .
	$(RUN) snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

# Every test, the slow ones included: what CI runs (.ci/run).
test: $(VENV)/.installed-test
	$(RUN) python -m pytest $(PYTEST_ARGS)

# The same suite without the tests marked slow (whole workflows, real training runs): for editing.
test-fast: $(VENV)/.installed-test
	$(RUN) python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(RUN) snakemake --lint

dry-run: $(VENV)/.installed
	$(RUN) snakemake -n $(SNAKEMAKE_ARGS)

clean:
	rm -rf resources results logs .snakemake
