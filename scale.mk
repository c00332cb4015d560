# Scaling out (docs/scaling.md). Included by the Makefile.
#   make remote REMOTE=<path|s3://bucket/path>   the project's default DVC remote (commit .dvc/config to share it)
#   make push / make pull                        every cached output and DVC's run cache to / from it
#   make team-up / team-down / team-status       PostgreSQL + MLflow server + Prefect server on loopback
#   make postgres-server                         install the PostgreSQL server binaries when missing (Debian)
#   (make bench-parallel, Dask against serial, is in the Makefile)
REMOTE ?= $(abspath $(CURDIR)/../pqd-dvc-remote)
TEAM_DIR ?= $(CURDIR)/.team
TEAM_ARTIFACTS ?= $(TEAM_DIR)/mlartifacts
TEAM_PG_PORT ?= 5433
PG_BIN ?=
TEAM_FLAGS = --dir $(TEAM_DIR) --artifacts $(TEAM_ARTIFACTS) --pg-port $(TEAM_PG_PORT) --mlflow-port $(MLFLOW_PORT) \
             --prefect-port $(PREFECT_PORT) $(if $(PG_BIN),--pg-bin $(PG_BIN))
PG_FOUND = $(or $(PG_BIN),$(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb)))

.PHONY: remote push pull team-up team-down team-status postgres-server

remote: setup
	@case "$(REMOTE)" in s3://*) $(BIN)/python -c "import dvc_s3" 2>/dev/null || \
	    $(BIN)/python -m pip install -q -c requirements.lock 'dvc-s3==3.3.0' ;; esac
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pqd.ops.remote set $(REMOTE)

push: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pqd.ops.remote push

pull: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pqd.ops.remote pull

# Debian's PostgreSQL server package, when no initdb is found (team-up and the tests' team servers need it)
postgres-server:
	@test -n "$(PG_FOUND)" || { echo "installing Debian's postgresql (server binaries for make team-up)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

team-up: setup postgres-server
	$(BIN)/python -m pqd.ops.team up $(TEAM_FLAGS)

team-down: setup
	$(BIN)/python -m pqd.ops.team down --dir $(TEAM_DIR)

team-status: setup
	$(BIN)/python -m pqd.ops.team status --dir $(TEAM_DIR)

