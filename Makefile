# One command to install and run the main job, one to install and test.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install ablate test clean

$(BIN)/dqar: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, so the package's torch requirement is already met.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/dqar

install: $(BIN)/dqar

# --resume: a first run starts the study, a re-run finishes an interrupted one or re-renders a finished one.
ablate: install
	$(BIN)/dqar ablate --resume

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) results *.egg-info
