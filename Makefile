# The two commands of the README. Each creates or reuses .venv and installs what it needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-fast install bench deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the project's requirements change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ballad-pipe report --reports reports

test: $(STAMP)
	$(BIN)/python -m pytest

# The everyday loop: every test but the slow ones (end-to-end, subprocesses, longer training runs), with the
# slowest ten listed. tests/conftest.py runs torch on one thread; `make test` runs everything.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=10

bench: $(STAMP)
	$(BIN)/python -m bench --quick

# dvc.yaml's code deps: each stage's exactly the project files its command runs (cli/deps.py); after
# moving, adding or importing a module. tests/test_dvc_yaml.py says when it is due.
deps: $(STAMP)
	$(BIN)/python -m cli.deps --write

clean:
	rm -rf data checkpoints features models reports .dvc/cache .dvc/tmp
