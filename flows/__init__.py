"""Prefect flows over the PQD pipeline: thin sequences of typed tasks (``flows.tasks``) over dvc commands
and pqd functions; no math lives here.

| flow | module | what it does |
|---|---|---|
| ``pqd-pipeline`` | ``flows.pipeline`` | ``dvc repro`` (or ``dvc exp run -S k=v ...``), then one MLflow run |
| ``pqd-sweep`` | ``flows.sweep`` | bit settings x methods as DVC experiments; an MLflow parent run with a child per cell; one results table |
| ``pqd-release`` | ``flows.release`` | release gate, then registration as ``candidate`` |
| ``pqd-benchmark`` | ``flows.benchmark`` | re-measure the current result and track it; served on a cron schedule |

Every module runs from the command line (``python -m flows.pipeline --help``).
"""
