"""``pqd-benchmark``: re-measure the current result on a schedule and track each measurement.

Each run brings the pipeline up to date (``dvc repro``), re-runs the measuring stages (``evaluate`` by
default: sampling, FID, timings) with ``dvc repro -f -s``, and records the result in the MLflow experiment
``pqd-benchmark`` tagged ``pqd.kind=benchmark``. ``python -m flows.benchmark serve`` serves it as a
deployment with a cron schedule against the Prefect API in ``PREFECT_API_URL`` (``make prefect-server``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow

from flows.tasks import dvc_repro, track_result
from pqd.ops.tracking import TrackedRun

BENCH_EXPERIMENT = "pqd-benchmark"
DEFAULT_CRON = "0 3 * * *"  # every night at 03:00
DEPLOYMENT = "pqd-benchmark-nightly"


@flow(name="pqd-benchmark")
def benchmark(root: str = ".", stages: list[str] | None = None, experiment: str = BENCH_EXPERIMENT) -> TrackedRun:
    """Bring the pipeline up to date, re-run ``stages`` (default ``["evaluate"]``), track the measurement."""
    dvc_repro(root)
    dvc_repro(root, force_stages=list(stages) if stages is not None else ["evaluate"])
    return track_result(root, experiment, tags={"pqd.kind": "benchmark"})


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.benchmark run | serve [--cron EXPR]``."""
    ap = argparse.ArgumentParser(prog="python -m flows.benchmark", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["run", "serve"])
    ap.add_argument("--root", default=".")
    ap.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule for serve (default {DEFAULT_CRON!r})")
    ap.add_argument("--stage", dest="stages", action="append", help="stage to re-measure (repeatable)")
    ap.add_argument("--experiment", default=BENCH_EXPERIMENT)
    args = ap.parse_args(argv)
    params = {"root": str(Path(args.root).resolve()), "stages": args.stages, "experiment": args.experiment}
    if args.command == "serve":
        from prefect.client.schemas.schedules import CronSchedule

        try:
            schedule = CronSchedule(cron=args.cron)
        except ValueError:
            print(f"pqd-benchmark: error: --cron {args.cron!r} is not allowed: expected a cron expression such as "
                  f"{DEFAULT_CRON!r}", file=sys.stderr)
            return 2
        from flows.benchmark import benchmark as served  # by module name, so the deployment's entrypoint resolves

        # limit=1: runs never overlap (they share the project folder and its dvc lock)
        served.serve(name=DEPLOYMENT, schedule=schedule, parameters=params, tags=["pqd", "benchmark"], limit=1)
        return 0
    state = benchmark(**params, return_state=True)
    if state.is_failed():
        print(f"pqd-benchmark: failed: {state.message}", file=sys.stderr)
        return 1
    run = state.result()
    print(f"pqd-benchmark: MLflow run {run.run_id} in experiment {args.experiment!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
