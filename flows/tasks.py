"""Typed Prefect tasks over pqd functions and dvc commands, shared by the flows.

DVC owns the pipeline's DAG, so each dvc invocation is one task. Only tasks that talk to MLflow (I/O
that can fail transiently) retry; a pipeline stage that fails is a real failure and is not retried.
No task caches: dvc commands have side effects, and DVC already skips what is up to date.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pqd.formats.repo import DvcOutcome, dvc
from pqd.ops import release as pqd_release
from pqd.ops import tracking
from pqd.params import apply_overrides, check_pipeline, params_from_dict

# thread settings a stage inherits: Dask workers set them to 1 for their own processes, so a stage run from a task
# on a worker gets the flow's values instead (the same thread count as a serial run: the same floats)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MLFLOW_RETRIES = 2  # a blip (a restarting server, a locked sqlite file); an outage fails fast, see pqd.ops.tracking
MLFLOW_RETRY_DELAY_S = [1, 4]


def thread_env() -> dict[str, str | None]:
    """This process's thread settings (None: unset), to hand to :func:`run_dvc` on another process."""
    return {k: os.environ.get(k) for k in THREAD_VARS}


def concurrent_env() -> dict[str, str | None]:
    """:func:`thread_env` for stages that run beside each other on one machine, with OpenMP threads that sleep while
    they wait (``OMP_WAIT_POLICY=PASSIVE`` unless this process sets it): spinning threads take the cores the other
    cells compute on (docs/benchmarks.md: two DiT demo cells side by side on 2 cores reconstructed at 170-280 s per
    unit without it, 40 s with it)."""
    return {**thread_env(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"}


def run_dvc(root: str | Path, args: list[str], log: Callable[[str], None] | None = None,
            env_vars: dict[str, str | None] | None = None) -> DvcOutcome:
    """:func:`pqd.formats.repo.dvc`: ``dvc <args>`` in ``root``, each line it prints to ``log``."""
    return dvc(root, args, log, env_vars)


@task(name="validate params", cache_policy=NO_CACHE)
def validate_params(root: str, overrides: list[str]) -> None:
    """Fail before any work when params.yaml with the overrides would be refused by a stage."""
    data = yaml.safe_load((Path(root) / "params.yaml").read_text(encoding="utf-8")) or {}
    check_pipeline(params_from_dict(apply_overrides(data, overrides)))


@task(name="dvc repro", cache_policy=NO_CACHE)
def dvc_repro(root: str, force_stages: list[str] | None = None) -> DvcOutcome:
    """``dvc repro`` (up-to-date stages are skipped), or re-run ``force_stages`` alone with ``-f -s``."""
    logger = get_run_logger()
    args = ["repro", "-f", "-s", *force_stages] if force_stages else ["repro"]
    out = run_dvc(root, args, logger.info)
    logger.info("%s: %.1f s, stages run: %s", out.command, out.seconds, ", ".join(out.ran_stages) or "none")
    return out


@task(name="dvc exp run", cache_policy=NO_CACHE)
def dvc_exp_run(root: str, overrides: list[str], name: str | None = None,
                env_vars: dict[str, str | None] | None = None) -> DvcOutcome:
    """``dvc exp run -S k=v ... [-n name]`` in the workspace; an experiment of the same name on this
    baseline is replaced (stages DVC has in its run cache are restored, not recomputed)."""
    logger = get_run_logger()
    args = ["exp", "run", *[a for o in overrides for a in ("-S", o)]]
    if name:
        if name in run_dvc(root, ["exp", "list", "--name-only"]).output.split():
            run_dvc(root, ["exp", "remove", name], logger.info)
        args += ["-n", name]
    out = run_dvc(root, args, logger.info, env_vars)
    logger.info("%s: %.1f s, stages run: %s", out.command, out.seconds, ", ".join(out.ran_stages) or "none")
    return out


@task(name="track in MLflow", retries=MLFLOW_RETRIES, retry_delay_seconds=MLFLOW_RETRY_DELAY_S, cache_policy=NO_CACHE)
def track_result(root: str, experiment: str, parent_run_id: str | None = None, run_name: str | None = None,
                 tags: dict[str, str] | None = None, store: str | None = None) -> tracking.TrackedRun:
    """One MLflow run for the result in ``root`` (reused when already tracked), in the tracking store of
    project ``store`` (default ``root``)."""
    run = tracking.track(root, experiment, parent_run_id=parent_run_id, run_name=run_name, extra_tags=tags,
                         store=store)
    get_run_logger().info("MLflow run %s (%s) %s", run.run_id, run.name, "created" if run.created else "reused")
    return run


@task(name="release gate", cache_policy=NO_CACHE)
def release_gate(root: str, allow_uncommitted: bool = False) -> pqd_release.GateReport:
    """The release gate on the result in ``root`` (no MLflow access)."""
    _, report = pqd_release.check(root, allow_uncommitted=allow_uncommitted)
    for c in report.checks:
        get_run_logger().info("gate %s: %s (%s)", c.name, c.verdict, c.detail)
    return report


@task(name="register candidate", retries=MLFLOW_RETRIES, retry_delay_seconds=MLFLOW_RETRY_DELAY_S,
      cache_policy=NO_CACHE)
def register_candidate(root: str, experiment: str, allow_uncommitted: bool = False) -> tracking.RegisteredVersion:
    """Register the gated result as a version of its model with the alias ``candidate``."""
    v = pqd_release.register_candidate(root, experiment, allow_uncommitted=allow_uncommitted)
    get_run_logger().info("%s version %s -> alias %s (%s)", v.name, v.version, v.alias,
                          "new" if v.created else "already registered")
    return v
