# The zoo's commands. The first call builds .venv from pyproject.toml; later calls reuse it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXP ?= fixmatch_digits
ARGS ?=
STEPS ?= 100
WORKERS ?= 1
BATCHES ?= 30
SEEDS ?= 0,1,2
RUN ?= ict_mnist
SAMPLE_STEPS ?= 1
OFFLINE ?=
# OFFLINE=1 adds the experiment's offline stand-in (experiments/offline/<EXP>.yaml) as a second config
OVERLAY = $(if $(OFFLINE),--config experiments/offline/$(EXP).yaml)

.PHONY: help venv train smoke test bench bench-data compare compare-digits compare-ssl sample clean

help: ## list the commands and every experiment
	@echo "Commands:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-16s %s\n", $$1, $$2}'
	@echo; echo "Experiments (make train EXP=<name>):"
	@for f in experiments/*.yaml; do \
		printf "  %-30s %s\n" "$$(basename $$f .yaml)" "$$(sed -n 's/^# //p;q' $$f)"; done

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed ## build the environment (.venv)

train: venv ## run an experiment: make train EXP=<name> ARGS="--key=value ..." [OFFLINE=1] (reruns resume)
	$(PY) -m zoo fit --config experiments/$(EXP).yaml $(OVERLAY) $(ARGS)

smoke: venv ## a few steps of an experiment with tiny sizes, in a throw-away run directory
	$(PY) -m zoo.tools.smoke experiments/$(EXP).yaml $(OVERLAY) $(ARGS)

bench: venv ## training throughput (samples/s) and data-wait share: make bench EXP=<name> STEPS=100
	$(PY) -m zoo.tools.bench experiments/$(EXP).yaml --steps $(STEPS) $(OVERLAY) $(ARGS)

bench-data: venv ## the input pipeline alone: samples/s per worker core per stream: make bench-data EXP=<name> WORKERS=1
	$(PY) -m zoo.tools.bench_data experiments/$(EXP).yaml --workers $(WORKERS) --batches $(BATCHES) $(ARGS)

test: venv ## the whole test suite (offline, CPU)
	$(PY) -m pytest tests $(ARGS)

compare-digits: venv ## FixMatch vs supervised on digits over SEEDS; writes zoo/fixmatch/results_digits.md
	$(PY) -m zoo.tools.compare --out zoo/fixmatch/results_digits.md --seeds $(SEEDS) \
		fixmatch=experiments/fixmatch_digits.yaml supervised=experiments/supervised_digits.yaml

compare: venv ## FixMatch, UDA, ShrinkMatch, SimMatchV2 and supervised on the CIFAR-10 subset (250 labels) over SEEDS
	$(PY) -m zoo.tools.compare --out docs/results/ssl_cifar10_subset.md --seeds $(SEEDS) \
		supervised=experiments/supervised_cifar10_subset.yaml fixmatch=experiments/fixmatch_cifar10_subset.yaml \
		uda=experiments/uda_cifar10_subset.yaml shrinkmatch=experiments/shrinkmatch_cifar10_subset.yaml \
		simmatchv2=experiments/simmatchv2_cifar10_subset.yaml $(ARGS)

compare-ssl: venv ## the SSL family's frozen-backbone table (random init, supervised, SimCLR, BYOL, GroCo, MoCo-v2, InterCLR) over SEEDS
	$(PY) -m zoo.tools.ssl_table --out docs/results/ssl_representations --seeds $(SEEDS) --datasets cifar10_subset \
		supervised=experiments/supervised_encoder_cifar10_subset.yaml simclr=experiments/simclr_cifar10_subset.yaml \
		byol=experiments/byol_cifar10_subset.yaml groco=experiments/groco_cifar10_subset.yaml \
		moco_v2=experiments/interclr_cifar10_subset_moco.yaml interclr=experiments/interclr_cifar10_subset.yaml $(ARGS)

sample: venv ## a PNG grid from a trained consistency model: make sample RUN=ict_mnist SAMPLE_STEPS=1|2
	$(PY) -m zoo.ict.sample --checkpoint runs/$(RUN)/checkpoints/last.ckpt \
		--out runs/$(RUN)/samples_$(SAMPLE_STEPS)step.png --steps $(SAMPLE_STEPS)

clean: ## remove run directories (checkpoints, offline W&B runs)
	rm -rf runs
