# Operations: MLflow tracking and releases, Prefect flows (docs/operations.md). Included by the Makefile.
#   make track            record the current result as one MLflow run (idempotent; re-run after an outage)
#   make ui               MLflow UI on http://127.0.0.1:$(MLFLOW_PORT): runs, metrics, grids, registered models
#   make prefect-server   Prefect server + UI on http://127.0.0.1:$(PREFECT_PORT)
#   make serve            serve the scheduled benchmark deployment (cron $(BENCH_CRON)) against that server
#   make sweep            bits x methods as DVC experiments, MLflow parent + child runs, one results table
#                         (cells at once on a Dask LocalCluster of SWEEP_WORKERS processes; 0: one after the other
#                         in the workspace; SWEEP_ADDRESS=tcp://host:port: on a running Dask scheduler)
#   make release          release gate, then register the result as the 'candidate' version
#                         (RELEASE_FLAGS=--allow-uncommitted: register a result whose dvc.lock is not committed)
#   make promote          move the 'production' alias to the candidate (or VERSION=n)
MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
BENCH_CRON ?= 0 3 * * *
SWEEP_BITS ?= w8a8,w4a8
SWEEP_METHODS ?= minmax,pqd
SWEEP_SET ?=
SWEEP_WORKERS ?= 2
SWEEP_ADDRESS ?=
VERSION ?=
RELEASE_FLAGS ?=
MLFLOW_DB := sqlite:///$(CURDIR)/mlflow.db
# flows report to the server of `make prefect-server` when it is up, else to a temporary local one
PREFECT_UP = $(shell $(BIN)/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$(PREFECT_PORT)/api/health', timeout=2)" 2>/dev/null && echo yes)
FLOW_ENV = PATH=$(CURDIR)/$(BIN):$$PATH $(if $(PREFECT_UP),PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api)

.PHONY: track ui prefect-server serve sweep release promote

track: setup
	$(BIN)/python -m pqd.ops.tracking track

ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_DB) --default-artifact-root $(CURDIR)/mlartifacts \
	    --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

prefect-server: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: setup
	@test -n "$(PREFECT_UP)" || { echo "make serve: no Prefect server on 127.0.0.1:$(PREFECT_PORT): run 'make prefect-server' first"; exit 2; }
	$(FLOW_ENV) $(BIN)/python -m flows.benchmark serve --cron "$(BENCH_CRON)"

sweep: setup check-params
	$(FLOW_ENV) $(BIN)/python -m flows.sweep --bits $(SWEEP_BITS) --methods $(SWEEP_METHODS) $(SWEEP_SET) \
	    --workers $(SWEEP_WORKERS) $(if $(SWEEP_ADDRESS),--address $(SWEEP_ADDRESS))

release: setup
	$(BIN)/python -m pqd.ops.release register $(RELEASE_FLAGS)

promote: setup
	$(BIN)/python -m pqd.ops.release promote $(if $(VERSION),--version $(VERSION))
