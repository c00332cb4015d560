# Two commands for a newcomer: `make run` (the pipeline on the embedded demo) and `make test`.
# Both set up .venv first; setup is skipped when pyproject.toml and requirements.lock are unchanged.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pqd-installed
export HF_HUB_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1
# OpenMP threads sleep instead of spinning while they wait: on a shared 2-core machine spinning threads
# slowed demo training from ~0.3 s to ~11 s per step when another job held the cores
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run test test-fast check-params clean-data bench bench-deploy bench-memory bench-coverage bench-parallel gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	@touch $(STAMP)

check-params: setup
	$(BIN)/python -m pqd.stages.preflight params.yaml

run: setup check-params
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	$(BIN)/python -m pqd.ops.report
	@# one MLflow run for this result (idempotent); an unreachable MLflow never fails the run
	-$(BIN)/python -m pqd.ops.tracking track

# the test files on TEST_WORKERS processes (pytest-xdist; a file is one unit of work, with its fixtures;
# tests/conftest.py queues the files with slow tests first)
TEST_WORKERS ?= 2
PYTEST = PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup postgres-server
	$(PYTEST) tests

# everything but the end-to-end runs marked slow: a minute and a half
test-fast: setup
	$(PYTEST) -m "not slow" tests

# methods x bits and the PQD ablations on the two demos, over BENCH_REPLICATES replicates, with intervals and
# paired verdicts (data/bench/bench.md): each cell a DVC experiment run by the sweep's runner (flows/bench.py), so
# DVC's run cache restores what did not change and a rerun computes only what is new; BENCH_ARGS: e.g.
# --rows glue --models demo:digits -S generate.eval_samples=200 --workers 2
BENCH_REPLICATES ?= 3
BENCH_ARGS ?=
bench: setup check-params
	$(FLOW_ENV) $(BIN)/python -m flows.bench --replicates $(BENCH_REPLICATES) $(BENCH_ARGS)

# denoiser latency: torch fp32 / bf16, onnxruntime fp32 / int8 (the export's graphs, with and without quantized glue
# and attention matmuls) against onnxruntime's quantize_static; demo and CIFAR-10-config UNets and the DiT demo
# (made here unless BENCH_DEPLOY_ARGS="--dit-model <a demo:digits-dit pipeline folder>")
BENCH_DEPLOY_ARGS ?=
bench-deploy: setup check-params
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro model
	$(BIN)/python -m pqd.bench.deploy $(BENCH_DEPLOY_ARGS)

# peak RSS of calibrate on a full-size CIFAR-10 DDPM UNet (random weights), 1024 calibration inputs
bench-memory: setup
	$(BIN)/python -m pqd.bench.memory --samples 1024 --out data/bench/memory.json

# Dask against serial on this machine: generate, a sweep, per-task overhead, and sharded block reconstruction (serial,
# a LocalCluster and separate scheduler + worker processes); the model and calibration set come from `dvc repro select`
BENCH_PARALLEL_ARGS ?= --calibrate-set calibrate.recon_iters=100
bench-parallel: setup check-params
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro select
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pqd.bench.parallel --out data/bench/parallel.md $(BENCH_PARALLEL_ARGS)

# the cost curve of calibrate (seconds and peak RSS per model, seconds per reconstruction unit): the demo UNets, the DiT
# demo and the CIFAR-10 UNet config at reduced iterations (random weights), fitted and extrapolated to SD-size models
bench-calibrate: setup
	$(BIN)/python -m pqd.bench.calibrate --out data/bench/calibrate.json

# coverage of the evaluation's intervals where the truth is known: Gaussian features at the demo's sizes and at a
# second size, then (after make run) the demo's own evaluation features as the population
bench-coverage: setup
	$(BIN)/python -m pqd.bench.coverage --out data/bench/coverage.json
	$(BIN)/python -m pqd.bench.coverage --trials 300 --n 500 --dim 64 --out data/bench/coverage-n500-d64.json
	$(BIN)/python -m pqd.bench.coverage --pool data --n 500 --out data/bench/coverage-demo-features.json

# the pipeline on a CUDA GPU against the same seeds on the CPU (CIFAR-10 UNet config, reduced sizes; at most 8 minutes
# on one GPU); refuses in one line without CUDA
gpu-check: setup
	$(BIN)/python -m pqd.bench.gpu --out data/bench/gpu_check.json

clean-data:
	rm -rf data/model data/trajectories data/samples data/calib data/qstate data/export data/metrics

-include ops.mk
-include scale.mk
