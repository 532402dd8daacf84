# lab: every job has a target; `make help` lists them. Setup is idempotent (.venv, re-run when the
# requirement files change) and installs torch first so nothing can swap it for a CUDA build.
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
.PHONY: help setup setup-gpu demo test test-slow data data-sample train multirun sweep sweep-worker bakeoff study curriculum mlflow-server compare \
        quantize eval bench-eval generate bench bench-data clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv from requirements.lock (every package pinned and hash-checked; CPU torch 2.13.0 first)

# requirements.lock holds every package with its hashes (Linux x86-64, Python 3.11; its header is the
# command that regenerates it). pip, setuptools and torch 2.13.0+cpu go in first, alone: the hash admits
# that one file, so no CUDA build can replace it. The rest is built, where only an sdist exists, with
# that setuptools (no build isolation: no unhashed build packages), then lab itself, then a consistency check.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	awk '/^[^ #]/ {keep = /^(pip|setuptools|torch)==/} keep' requirements.lock > $(VENV)/first.lock
	$(PY) -m pip install -q --require-hashes --no-deps -r $(VENV)/first.lock
	$(PY) -m pip install -q --require-hashes --no-build-isolation -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

setup-gpu: setup ## GPU extras on a GPU machine: build and install mamba-ssm, causal-conv1d with nvcc (run `scripts/build_gpu_kernels.sh download` where PyPI is reachable first)
	PYTHON=$(PY) bash scripts/build_gpu_kernels.sh build

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
