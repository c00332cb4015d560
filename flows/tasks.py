"""Typed Prefect tasks over pqd functions and dvc commands, shared by the flows.

DVC owns the pipeline's DAG, so each dvc invocation is one task. Only tasks that talk to MLflow (I/O
that can fail transiently) retry; a pipeline stage that fails is a real failure and is not retried.
No task caches: dvc commands have side effects, and DVC already skips what is up to date.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pqd.ops import release as pqd_release
from pqd.ops import tracking
from pqd.params import apply_overrides, params_from_dict

BIN = Path(sys.executable).parent
# thread settings a stage inherits: Dask workers set them to 1 for their own processes, so a stage run from a task
# on a worker gets the flow's values instead (the same thread count as a serial run: the same floats)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MLFLOW_RETRIES = 2  # a blip (a restarting server, a locked sqlite file); an outage fails fast, see pqd.ops.tracking
MLFLOW_RETRY_DELAY_S = [1, 4]


class DvcError(RuntimeError):
    """A dvc command failed; the message is its last error line."""


@dataclass(frozen=True)
class DvcOutcome:
    command: str
    seconds: float
    ran_stages: tuple[str, ...]  # stages dvc really ran (not skipped or restored from its run cache)
    output: str  # what dvc printed (a progress bar's last state only)


def thread_env() -> dict[str, str | None]:
    """This process's thread settings (None: unset), to hand to :func:`run_dvc` on another process."""
    return {k: os.environ.get(k) for k in THREAD_VARS}


def run_dvc(root: str | Path, args: list[str], log: Callable[[str], None] | None = None,
            env_vars: dict[str, str | None] | None = None) -> DvcOutcome:
    """Run ``dvc <args>`` in ``root`` with this environment's executables first on PATH (stage commands
    call ``python``) and ``env_vars`` set (None: unset), passing each line it prints to ``log`` as it comes (a
    progress bar's last state only); raise DvcError with dvc's last error line when it fails."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k, v in (env_vars or {}).items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    dvc = str(BIN / "dvc") if (BIN / "dvc").exists() else "dvc"
    t0 = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen([dvc, *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        for raw in proc.stdout:
            line = raw.rstrip("\n").split("\r")[-1].rstrip()
            if line:
                lines.append(line)
                if log is not None:
                    log(line)
    seconds = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        errors = [ln for ln in lines if "error" in ln.lower()] or lines or [f"exit status {proc.returncode}"]
        raise DvcError(f"dvc {' '.join(args)} failed: {errors[-1].strip()}")
    ran = tuple(ln.split("'")[1] for ln in lines if ln.startswith("Running stage '"))
    return DvcOutcome(f"dvc {' '.join(args)}", seconds, ran, "\n".join(lines))


@task(name="validate params", cache_policy=NO_CACHE)
def validate_params(root: str, overrides: list[str]) -> None:
    """Fail before any work when params.yaml with the overrides would be refused by a stage."""
    data = yaml.safe_load((Path(root) / "params.yaml").read_text(encoding="utf-8")) or {}
    params_from_dict(apply_overrides(data, overrides))


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
