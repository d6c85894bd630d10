# vlt: every target is one CLI call with a config file; hyperparameters live in conf/, not here.
# `make help` lists the targets. Variables: PYTHON, VENV, TORCH, CONFIG, ARGS (see below).

SHELL := /bin/bash
.DEFAULT_GOAL := help

#: PYTHON  interpreter that creates the virtual environment
PYTHON ?= python3
#: VENV    environment folder; bring your own with VENV=/path/to/env
VENV ?= .venv
#: TORCH   torch requirement; a cluster keeps its CUDA build with TORCH=torch
TORCH ?= torch==2.13.0
#: EXTRAS  optional dependency groups installed with the package
EXTRAS ?= dev,data
#: CONFIG  config file of a stage target (each target has its tiny default)
#: ARGS    extra CLI overrides, e.g. ARGS="--trainer.max_steps=100"
ARGS ?=
#: LAUNCH  local (default) or slurm: where stage targets run
#: VLT_QUIET=1 (environment) drops progress lines and summaries; VLT_PROGRESS_EVERY=N: seconds between lines
LAUNCH ?= local
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlt-installed

SYNTHETIC := data/synthetic/shards/info.json
PHOTOS := data/photos/shards/info.json
FEATURES := data/features/LATEST

#: NODES   LAUNCH=slurm: nodes of the job
NODES ?= 1
#: GPUS    LAUNCH=slurm: GPUs (= tasks) per node; GPUS=0 runs DEVICES CPU tasks per node (DDP on gloo)
GPUS ?= 1
#: DEVICES LAUNCH=slurm with GPUS=0: CPU tasks per node
DEVICES ?= 1
#: CPUS    LAUNCH=slurm: CPUs per task (data workers + 1); TIME, PARTITION, ACCOUNT go to sbatch when set
CPUS ?=
TIME ?=
PARTITION ?=
ACCOUNT ?=
SUBMIT = NODES=$(NODES) GPUS=$(GPUS) DEVICES=$(DEVICES) CPUS=$(CPUS) TIME=$(TIME) PARTITION=$(PARTITION) \
	ACCOUNT=$(ACCOUNT) VLT=$(BIN)/vlt scripts/slurm/submit.sh

# $(call launch,CLI ARGS): run one `vlt` command here, or submit it (LAUNCH=slurm).
launch = $(if $(filter slurm,$(LAUNCH)),$(SUBMIT),$(BIN)/vlt) $(1) $(ARGS)

#: TOKENIZER  stage-1 checkpoint that stage 2 caches latents from
TOKENIZER ?= runs/tokenizer-tiny/checkpoints/last.ckpt
#: LATENTS    latent cache folder of stage 2
LATENTS ?= data/latents/tokenizer-tiny
#: DIT        stage-2 checkpoint (sample, finetune)
DIT ?= runs/dit-tiny/checkpoints/last.ckpt
#: ADAPTIVE   latent cache with per-image PSNR curves (content-adaptive mode); BUDGET: its mean K
ADAPTIVE ?= data/latents/tokenizer-tiny-adaptive
BUDGET ?= 8
#: DISTORTION what the allocation minimises: mse (busy images get the tokens) or neg_psnr (mean dB)
DISTORTION ?= mse

.PHONY: help install data test test-fast lint format tensorboard clean train-tokenizer train-dit cache-latents sample \
	allocate train-dit-adaptive experiment-adaptive experiment-paper finetune finetune-compare export

help: ## show this help
	@echo "vlt make targets:"
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'
	@echo "variables:"
	@grep -hE '^#: ' $(MAKEFILE_LIST) | sed -E 's/^#: /  /'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP) ## create/refresh the virtual environment (re-runs only when pyproject.toml changes)

data: $(STAMP) ## (re)build the embedded shard sets (synthetic + photos) and the vltnet feature net (data/features)
	$(BIN)/vlt data synthetic --out data/synthetic/shards
	$(BIN)/vlt data photos --out data/photos/shards
	$(BIN)/vlt features --out data/features

$(SYNTHETIC): | $(STAMP)
	$(BIN)/vlt data synthetic --out data/synthetic/shards
$(PHOTOS): | $(STAMP)
	$(BIN)/vlt data photos --out data/photos/shards
$(FEATURES): | $(STAMP)
	$(BIN)/vlt features --out data/features

train-tokenizer: $(STAMP) $(SYNTHETIC) $(PHOTOS) ## stage 1: train the tokenizer (CONFIG=conf/tokenizer/tiny.yaml)
	$(call launch,fit -c $(or $(CONFIG),conf/tokenizer/tiny.yaml))

$(TOKENIZER):
	$(MAKE) --no-print-directory train-tokenizer CONFIG= ARGS= LAUNCH=local

#: SHARDS     image shard folder that cache-latents encodes (its train-*.tar and val-*.tar)
SHARDS ?= data/synthetic/shards
# The embedded shards are built on demand; other SHARDS must exist.
SHARDS_BUILT := $(if $(filter data/synthetic/shards,$(SHARDS)),$(SYNTHETIC))
#: CACHE_ARGS extra options of cache-latents, e.g. CACHE_ARGS="--batch-size 512 --devices 8"
CACHE_ARGS ?=
# $(call cache_split,SPLIT,OUT,EXTRA): one split through `vlt cache-latents` (resumes a killed run).
cache_split = cache-latents --tokenizer $(TOKENIZER) --shards '$(SHARDS)/$(1)-*.tar' --out $(2) --split $(1) \
	--overwrite true $(3) $(CACHE_ARGS)

$(LATENTS)/done-train-r0.json: $(TOKENIZER) $(SHARDS_BUILT) | $(STAMP)
	$(BIN)/vlt $(call cache_split,train,$(LATENTS))
	$(BIN)/vlt $(call cache_split,val,$(LATENTS))

ifeq ($(LAUNCH),slurm)
cache-latents: $(STAMP) $(SHARDS_BUILT) $(TOKENIZER)
	$(SUBMIT) $(call cache_split,train,$(LATENTS))
	$(SUBMIT) $(call cache_split,val,$(LATENTS))
else
cache-latents: $(LATENTS)/done-train-r0.json ## encode SHARDS with TOKENIZER into LATENTS (if stale; LAUNCH=slurm: a job per split, a task per GPU)
endif

train-dit: $(STAMP) $(FEATURES) $(LATENTS)/done-train-r0.json ## stage 2: train the DiT on cached latents (CONFIG=conf/dit/tiny.yaml)
	$(call launch,fit -c $(or $(CONFIG),conf/dit/tiny.yaml) --latents=$(LATENTS) --model.init_args.tokenizer=$(TOKENIZER))

sample: $(STAMP) ## sample grids + npz at every K from DIT (ARGS="--count 50000 --batch-size 250": FID-50K; LAUNCH=slurm)
	$(call launch,sample --dit $(DIT) --out $(dir $(patsubst %/,%,$(dir $(DIT))))samples)

$(DIT):
	$(MAKE) --no-print-directory train-dit CONFIG= ARGS= LAUNCH=local

#: EXPORT     export folder of `make export` (default exports/<run name>)
export: $(STAMP) $(DIT) ## export DIT as safetensors folders (generator/ + tokenizer/; vlt.load reads them)
	$(BIN)/vlt export $(DIT) $(or $(EXPORT),exports/$(notdir $(patsubst %/checkpoints/,%,$(dir $(DIT)))))

# Content-adaptive K (vlt's extension): PSNR curves per image in the cache, then K_i at a mean budget.
$(ADAPTIVE)/done-train-r0.json: $(TOKENIZER) $(SHARDS_BUILT) | $(STAMP)
	$(BIN)/vlt $(call cache_split,train,$(ADAPTIVE),--distortion true)
	$(BIN)/vlt $(call cache_split,val,$(ADAPTIVE),--distortion true)

allocate: $(ADAPTIVE)/done-train-r0.json ## per-image K_i at mean budget BUDGET over ADAPTIVE (vlt allocate; ARGS for rule/cost)
	$(BIN)/vlt allocate --cache $(ADAPTIVE) --budget $(BUDGET) --distortion $(DISTORTION) $(ARGS)

train-dit-adaptive: $(STAMP) $(FEATURES) $(ADAPTIVE)/done-train-r0.json ## stage 2, adaptive: K-conditioned DiT on K-bucketed batches
	test -f $(ADAPTIVE)/allocation.json || $(BIN)/vlt allocate --cache $(ADAPTIVE) --budget $(BUDGET) --distortion $(DISTORTION)
	$(call launch,fit -c $(or $(CONFIG),conf/dit/tiny-adaptive.yaml) --latents=$(ADAPTIVE) --model.init_args.tokenizer=$(TOKENIZER))

experiment-adaptive: $(STAMP) $(FEATURES) $(TOKENIZER) $(DIT) ## adaptive vs fixed K (stages 1+2) and coarse-to-fine sampling vs FLOPs, tables + figures (CPU, ~60 min)
	$(BIN)/python scripts/experiment_adaptive.py --tokenizer $(TOKENIZER) --dit $(DIT) --latents $(ADAPTIVE) \
		--distortion $(DISTORTION) $(ARGS)

#: NESTED     nested-dropout tokenizer that experiment-paper reuses when it exists (else it trains one)
NESTED ?= runs/tokenizer-tiny-nested/checkpoints/last.ckpt
experiment-paper: $(STAMP) $(SYNTHETIC) $(FEATURES) ## Table 1/3/4 analogues: LGM vs nested dropout, guidance sweep, ablations (CPU, ~90 min)
	$(BIN)/python scripts/experiment_paper.py --reuse lgm=$(TOKENIZER) nested=$(NESTED) dit-lgm-seed0=$(DIT) $(ARGS)

finetune: $(STAMP) $(FEATURES) $(TOKENIZER) $(DIT) ## stage 3: joint fine-tune of TOKENIZER + DIT (CONFIG=conf/joint/tiny.yaml), then before / after / stage 2 trained longer
	$(call launch,fit -c $(or $(CONFIG),conf/joint/tiny.yaml) --model.init_args.init_from_tokenizer=$(TOKENIZER) --model.init_args.init_from_dit=$(DIT))
ifneq ($(LAUNCH),slurm)
	$(MAKE) --no-print-directory finetune-compare
endif

#: JOINT      joint fine-tune run directory that finetune-compare reads (default runs/joint-tiny)
JOINT ?= runs/joint-tiny
#: JOINT_SEEDS training seeds of the joint fine-tune in finetune-compare (JOINT is seed 0; the others run there)
JOINT_SEEDS ?= 3
finetune-compare: $(STAMP) $(FEATURES) ## stage 3 (JOINT_SEEDS training seeds) vs stage 2 trained longer (equal steps, equal time): runs/finetune-compare/results.md
	$(BIN)/python scripts/finetune_compare.py --joint $(JOINT) --dit $(DIT) --train-seeds $(JOINT_SEEDS)

# The slurm tier: a one-node Slurm started here, the tests, and the cluster stopped whatever they did.
slurm_tier = (scripts/slurm/local_cluster.sh up >/dev/null || echo "no local Slurm: the slurm tests will skip"; \
	SLURM_CONF=$(CURDIR)/.slurm/slurm.conf $(BIN)/python -m pytest -q -m slurm; status=$$?; \
	scripts/slurm/local_cluster.sh down; exit $$status)

test: $(STAMP) ## run every test tier (unit, data, config, smoke, ddp, notebooks), then slurm (a local Slurm)
	$(BIN)/python -m pytest -q -m "not slurm"; status=$$?; $(slurm_tier) || status=1; exit $$status

.PHONY: test-slurm slurm-up slurm-down
test-slurm: $(STAMP) ## slurm tier: start a one-node Slurm here (root; installs it via apt), run it, stop it
	$(slurm_tier)

slurm-up: ## start the local one-node Slurm (root); prints `export SLURM_CONF=...` for sbatch/squeue
	scripts/slurm/local_cluster.sh up

slurm-down: ## stop the local Slurm started by slurm-up
	scripts/slurm/local_cluster.sh down

test-fast: $(STAMP) ## unit/contract/config/data tests only (skips slow, ddp and slurm tiers)
	$(BIN)/python -m pytest -q -m "not slow and not ddp and not slurm"

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check vlt tests bench
	$(BIN)/ruff format --check vlt tests bench

format: $(STAMP) ## apply ruff formatting and safe fixes
	$(BIN)/ruff check --fix vlt tests bench
	$(BIN)/ruff format vlt tests bench

tensorboard: $(STAMP) ## serve TensorBoard over runs/ (PORT=6006)
	$(BIN)/tensorboard --logdir runs --port $${PORT:-6006}

clean: ## remove caches and build outputs (keeps .venv, data shards and runs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
