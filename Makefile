# hp-pipe: `make run` installs and runs the main job on DATASET; `make test` installs and runs the tests.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATASET ?= synthetic
WORKDIR ?= work
ARGS    ?=
METHOD  ?=
HP      := $(BIN)/hp-pipe
M       := $(if $(METHOD),--method $(METHOD),)

.PHONY: install install-gpu run segment prepare features train evaluate report compare tensorboard status bench test test-all mutation lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# CUDA machines: faiss-gpu replaces faiss-cpu (both provide the `faiss` module, so they cannot sit side by side).
install-gpu: install
	$(BIN)/python -m pip uninstall -q -y faiss-cpu
	$(BIN)/python -m pip install -q faiss-gpu-cu12

run: install   ## the main job on DATASET (default: the built-in synthetic set); METHOD=hcl (any registered method) for another
	$(HP) features --dataset $(DATASET) --workdir $(WORKDIR) $(M) $(ARGS)
	$(HP) train --dataset $(DATASET) --workdir $(WORKDIR) $(M) $(ARGS)
	$(HP) evaluate --dataset $(DATASET) --workdir $(WORKDIR) $(M) $(ARGS)
	$(HP) status --dataset $(DATASET) --workdir $(WORKDIR) $(M)

segment: install   ## your own photos, no labels needed: make segment DIR=photos (METHOD=stego, ARGS="--clusters 8")
	$(if $(DIR),,$(error give the folder of images: make segment DIR=photos))
	$(HP) segment $(DIR) --workdir $(WORKDIR) $(M) $(ARGS)

prepare: install
	$(HP) prepare --dataset $(DATASET) --workdir $(WORKDIR) $(ARGS)

features: install
	$(HP) features --dataset $(DATASET) --workdir $(WORKDIR) $(M) $(ARGS)

train: install
	$(HP) train --dataset $(DATASET) --workdir $(WORKDIR) $(M) $(ARGS)

evaluate: install
	$(HP) evaluate --dataset $(DATASET) --workdir $(WORKDIR) $(M) $(ARGS)

report: install   ## report.md and the self-contained report.html of the run's evaluation
	$(HP) report --dataset $(DATASET) --workdir $(WORKDIR) --html

compare: install   ## every evaluated run of DATASET, whatever its method, in one table (also compare.md)
	$(HP) compare --dataset $(DATASET) --workdir $(WORKDIR)

tensorboard: install   ## every run of DATASET side by side (hp-pipe itself never starts a server)
	$(BIN)/tensorboard --logdir $(WORKDIR)/$(DATASET)/runs $(ARGS)

status: install
	$(HP) status --dataset $(DATASET) --workdir $(WORKDIR) $(M) $(ARGS)

bench: install
	$(HP) bench features --workdir $(WORKDIR) $(ARGS)

# one worker per core, each test file on one worker (its module fixtures built once); the tests marked slow run
# where CI is set (.ci/run sets it) and in test-all, and are skipped with their reason otherwise
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto --dist loadfile tests

test-all: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto --dist loadfile --slow tests

mutation: install   ## mutation testing of the numeric and integrity core (slow, not in CI): docs/results.md; ARGS=MODULE for one
	$(BIN)/python -m pip install -q 'mutmut>=3.3'
	HF_HUB_OFFLINE=1 $(BIN)/python tests/mutation.py $(ARGS)

lint: install
	$(BIN)/ruff check pipeline stages cache benches tests

clean:
	rm -rf $(WORKDIR)
