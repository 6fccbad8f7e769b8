# hp-pipe: `make run` installs and runs the main job on DATASET; `make test` installs and runs the tests.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATASET ?= synthetic
WORKDIR ?= work
ARGS    ?=
HP      := $(BIN)/hp-pipe

.PHONY: install run prepare features train evaluate report status bench test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install   ## the main job: every stage that exists, on DATASET (default: the built-in synthetic set)
	$(HP) features --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)
	$(HP) train --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)
	$(HP) evaluate --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)
	$(HP) status --dataset $(DATASET) --workdir $(WORKDIR)

prepare: install
	$(HP) prepare --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)

features: install
	$(HP) features --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)

train: install
	$(HP) train --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)

evaluate: install
	$(HP) evaluate --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)

report: install
	$(HP) report --dataset $(DATASET) --workdir $(WORKDIR)

status: install
	$(HP) status --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)

bench: install
	$(HP) bench features --workdir $(WORKDIR) $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check pipeline stages cache tests

clean:
	rm -rf $(WORKDIR)
