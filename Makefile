# lab: every job has a target; `make help` lists them. Setup is idempotent (.venv, re-run when the
# requirement files change or the torch flavour switches) and installs torch first, alone, from the lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
ARCHS := llama_gqa,mistral_swa,falcon_mqa,mamba2,llama_mha
# The real corpus for `make data` / `make bench-data` (web.jsonl + books/).
CORPUS ?= $(abspath ../shared/corpus/ro)
# The embedded sample at tiny sizes (conf/experiment/tiny_sample.yaml): what `make demo` and the tests use.
DEMO := experiment=demo
# The data half of tiny_sample: lab.prepare has no size or trainer group, so it cannot read that file and
# takes these overrides instead; they must match it (tests/test_trust_config.py checks).
DEMO_DATA := tokenizer=bpe2k data.seq_len=64
# make sweep / make bakeoff
ARCH ?= llama_gqa
BAKEOFF ?= arch_bakeoff
EXPERIMENT ?= demo
# make bakeoff LAUNCHER=local_parallel GPUS=8 | LAUNCHER=slurm (conf/hydra/launcher/); empty: one job after another
LAUNCHER ?=
GPUS ?= 2
# make sweep-worker STORAGE=postgresql+psycopg://user@host:5432/optuna (one command per worker, any host)
STORAGE ?=
# make mlflow-server [MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=5000 MLFLOW_BACKEND=... MLFLOW_ARTIFACTS=s3://...]
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000

.DEFAULT_GOAL := help
.PHONY: help setup setup-gpu lock demo test test-slow data data-sample train multirun sweep sweep-worker bakeoff study curriculum mlflow-server compare \
        quantize eval bench-eval generate bench bench-data clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

setup: ## create .venv from the hashed lock for this machine's torch (cpu, or cuda where an NVIDIA GPU is; TORCH=cpu|cuda chooses)
	@line=$$($(PYTHON) scripts/torch_flavour.py) || exit 1; echo "setup: $$line"; \
	flavour=$${line%%:*}; flavour=$${flavour#torch=}; \
	if [ "$$flavour" = cpu ] && [ -e $(VENV)/.cpu-torch-unreachable ] && [ -z "$(TORCH)" ]; then \
	  echo "setup: using the cuda lock: torch $(TORCH_VERSION)+cpu could not be installed here before (rm $(VENV)/.cpu-torch-unreachable to retry)"; \
	  flavour=cuda; fi; \
	$(MAKE) --no-print-directory -q $(VENV)/.installed-$$flavour || $(MAKE) --no-print-directory $(VENV)/.installed-$$flavour

# make setup TORCH=cuda (or cpu) overrides the probe; empty: scripts/torch_flavour.py decides.
TORCH ?=
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
# Where the CPU build is tried when pip's own configuration has no torch X+cpu (never reached on this CI
# image, whose find-links folder holds it).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# make itself, named so that `make -n` does not run the fallback line that holds it (it would install torch)
RECURSE = $(MAKE)
# The lock entries of NAMES (a regex) into FILE: $(call lock_entries,NAMES,LOCK,FILE)
lock_entries = awk '/^[^ \#]/ {keep = /^($(1))==/} keep' $(2) > $(3)
# A venv of the other flavour is cleared first: pip counts 2.13.0+cpu as satisfying torch==2.13.0, and
# nvidia-* would linger. Then pip and setuptools, from the lock with their hashes.
define fresh_venv
	if [ -e $(VENV)/.installed-$(2) ]; then echo "setup: switching .venv from torch $(2) to $(1): re-installing"; \
	  $(PYTHON) -m venv --clear $(VENV); else test -x $(PY) || $(PYTHON) -m venv $(VENV); fi
	rm -f $(VENV)/.installed $(VENV)/.installed-$(2)
	$(call lock_entries,pip|setuptools,requirements-$(1).lock,$(VENV)/bootstrap.lock)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(VENV)/bootstrap.lock
endef
# The whole lock (what is already in, torch first, stays), where only an sdist exists built with the
# lock's setuptools (no build isolation: no unhashed build packages), then lab itself, then a consistency
# check. One shell line, so that the cpu rule can take it or the fallback.
install_lock = $(PY) -m pip install -q --require-hashes --no-build-isolation -r requirements-$(1).lock && \
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . && \
	$(PY) -m pip check && \
	echo "$(1)" > $(VENV)/torch-flavour && touch $(VENV)/.installed-$(1) $(VENV)/.installed

# CPU: torch X+cpu first, alone (its hash admits that one file), from pip's own configuration (here the
# find-links folder /opt/wheels); else PyTorch's CPU index for that one line; else the cuda lock, whose
# torch (PyPI's default build) runs on the CPU too.
$(VENV)/.installed-cpu: requirements-cpu.lock pyproject.toml
	$(call fresh_venv,cpu,cuda)
	$(call lock_entries,torch,requirements-cpu.lock,$(VENV)/torch.lock)
	if $(PY) -m pip install -q --require-hashes --no-deps -r $(VENV)/torch.lock || \
	   { echo "setup: torch $(TORCH_VERSION)+cpu is not among pip's sources here; trying PyTorch's CPU index ($(TORCH_CPU_INDEX))" && \
	     $(PY) -m pip install -q --require-hashes --no-deps --index-url $(TORCH_CPU_INDEX) -r $(VENV)/torch.lock; }; then \
	  $(call install_lock,cpu); \
	else echo "setup: no torch $(TORCH_VERSION)+cpu with the lock's hash on PyTorch's CPU index either; falling back to the cuda lock (PyPI's default build, which runs on the CPU too)" && \
	  touch $(VENV)/.cpu-torch-unreachable && $(RECURSE) --no-print-directory $(VENV)/.installed-cuda; fi

# CUDA: torch X as PyPI serves it on Linux x86-64 first, alone; its nvidia-* and triton come with the lock.
$(VENV)/.installed-cuda: requirements-cuda.lock pyproject.toml
	$(call fresh_venv,cuda,cpu)
	$(call lock_entries,torch,requirements-cuda.lock,$(VENV)/torch.lock)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(VENV)/torch.lock
	$(call install_lock,cuda)

lock: ## regenerate requirements-{cpu,cuda,gpu-kernels}.lock from pyproject.toml + constraints.txt (uv 0.13.9, from PyPI)
	bash scripts/lock.sh

# The fused kernels of requirements-gpu-kernels.lock (sdists only on PyPI), hash-checked, compiled by
# scripts/build_gpu_kernels.sh against the cuda lock's torch. The probe stops a machine without a GPU first.
setup-gpu: ## on an NVIDIA GPU machine: cuda .venv + mamba-ssm and causal-conv1d compiled with nvcc (one error line elsewhere)
	@line=$$($(PYTHON) scripts/torch_flavour.py --need-gpu) || exit 1; echo "setup-gpu: $$line"
	$(MAKE) --no-print-directory setup TORCH=cuda
	$(MAKE) --no-print-directory $(VENV)/.gpu-kernels

$(VENV)/.gpu-kernels: requirements-gpu-kernels.lock $(VENV)/.installed-cuda
	PYTHON=$(PY) bash scripts/build_gpu_kernels.sh download
	PYTHON=$(PY) bash scripts/build_gpu_kernels.sh build
	touch $@

demo: setup ## prepare the sample, train all five archs (tiny, CPU), print the comparison table
	$(PY) -m lab.prepare $(DEMO_DATA)
	$(PY) -m lab.train -m $(DEMO) arch=$(ARCHS) trainer.enable_progress_bar=false
	$(PY) -m lab.compare --experiment demo --latest-per-arch

test: setup ## run the test suite (no GPU, no data outside the repo; slow tests excluded)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: setup ## the slow end-to-end tests
	$(PY) -m pytest -m "slow" -q

data: setup ## clean, dedup, tokenize and pack the real corpus (CORPUS=path/to/corpus)
	$(PY) -m lab.prepare data=web_then_books tokenizer=bpe40k paths.corpus_dir=$(CORPUS)

data-sample: setup ## prepare the embedded sample at the demo's sizes
	$(PY) -m lab.prepare $(DEMO_DATA)

train: setup ## train one arch: make train ARGS="arch=mamba2"
	$(PY) -m lab.train $(ARGS)

multirun: setup ## all five archs as one Hydra multirun: make multirun ARGS="experiment=demo"
	$(PY) -m lab.train -m arch=$(ARCHS) $(ARGS)

sweep: setup ## Optuna learning-rate sweep of one arch: make sweep ARCH=mamba2 [ARGS="size=tiny ..."]
	$(PY) -m lab.train -m sweep=lr arch=$(ARCH) $(ARGS)

sweep-worker: setup ## one worker of a shared Optuna study: make sweep-worker STORAGE=postgresql+psycopg://... ARCH=mamba2
	@test -n "$(STORAGE)" || { echo "error: STORAGE is empty; give STORAGE=postgresql+psycopg://user@host:5432/db (the study's shared database)"; exit 1; }
	$(PY) -m lab.train -m sweep=lr arch=$(ARCH) 'hydra.sweeper.storage=$(STORAGE)' hydra.sweeper.n_jobs=1 $(ARGS)

bakeoff: setup ## five archs x seeds, one MLflow experiment: make bakeoff [BAKEOFF=arch_bakeoff_tiny] [LAUNCHER=local_parallel GPUS=8]
	LAB_GPUS=$(GPUS) $(PY) -m lab.train -m experiment=$(BAKEOFF) \
	  $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) $(if $(filter local_parallel,$(LAUNCHER)),hydra.sweeper.max_batch_size=$(GPUS)) $(ARGS)
	$(PY) -m lab.compare --experiment $(BAKEOFF)

mlflow-server: setup ## MLflow tracking server on 127.0.0.1:5000 (MLFLOW_BACKEND=sqlite|postgresql URI, MLFLOW_ARTIFACTS=any URI)
	MLFLOW_HOST=$(MLFLOW_HOST) MLFLOW_PORT=$(MLFLOW_PORT) bash scripts/mlflow_server.sh

study: setup ## the whole study, resumable: prepare, train, quantize, evaluate, report (make study EXPERIMENT=arch_bakeoff_tiny [ARGS=--dry-run])
	$(PY) -m lab.study experiment=$(EXPERIMENT) $(ARGS)

curriculum: setup ## curricula x seeds at equal tokens (tiny, CPU) from one prepare, then the table by curriculum
	$(PY) -m lab.prepare $(DEMO_DATA)
	$(PY) -m lab.train -m experiment=curriculum_study_tiny $(ARGS)
	$(PY) -m lab.compare --experiment curriculum_study_tiny --by curriculum --latest-per-arch

compare: setup ## table + plots from MLflow: make compare [EXPERIMENT=arch_bakeoff] [ARGS="--tag bakeoff=v1"]
	$(PY) -m lab.compare --experiment $(EXPERIMENT) $(ARGS)

quantize: setup ## torchao variants of a model: make quantize ARGS="model_path=outputs/.../hf"
	$(PY) -m lab.quantize $(ARGS)

eval: setup ## perplexity, bits-per-byte and efficiency of a model and its variants
	$(PY) -m lab.evaluate $(ARGS)

bench-eval: setup ## quantized-vs-float benchmark (perplexity drift, decode speed, memory)
	$(PY) -m lab.bench_eval $(ARGS)

generate: setup ## sample text: make generate ARGS="model_path=... prompt='Era odată'"
	$(PY) -m lab.generate $(ARGS)

bench: setup ## training throughput/MFU per arch, tuned vs plain (needs a GPU for real numbers)
	$(PY) -m lab.bench $(ARGS)

bench-data: setup ## data pipeline MiB/s and peak RSS on the real corpus (CORPUS=...)
	$(PY) -m lab.bench_data --corpus $(CORPUS) --batch-mb 4 $(ARGS)   # small shards keep every core busy on ~55 MB

clean: ## remove run outputs (keeps .venv, data/prepared and the MLflow store)
	rm -rf outputs multirun/*/ lightning_logs .pytest_cache
