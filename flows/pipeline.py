"""``pqd-pipeline``: run the DVC pipeline, then record the result as one MLflow run.

Without overrides it is ``dvc repro``; with ``-S key=value`` overrides it is ``dvc exp run -S ...`` (a DVC
experiment, nothing edited by hand). Tracking runs after DVC has finished, so when MLflow is unreachable the
flow fails at the tracking task with the result already complete in ``data/``; ``make track`` records it later.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from prefect import flow

from flows.tasks import DvcOutcome, dvc_exp_run, dvc_repro, track_result, validate_params
from pqd.ops.tracking import DEFAULT_EXPERIMENT, TrackedRun


@dataclass(frozen=True)
class PipelineResult:
    dvc: DvcOutcome
    run: TrackedRun


@flow(name="pqd-pipeline")
def pipeline(root: str = ".", overrides: list[str] | None = None, name: str | None = None,
             experiment: str = DEFAULT_EXPERIMENT) -> PipelineResult:
    """Reproduce (``overrides`` empty) or run an experiment with ``overrides`` (``key=value``), then track."""
    overrides = list(overrides or [])
    validate_params(root, overrides)
    outcome = dvc_exp_run(root, overrides, name) if overrides else dvc_repro(root)
    return PipelineResult(outcome, track_result(root, experiment))


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.pipeline [-S key=value ...] [--name NAME]``."""
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", help="experiment name (with -S)")
    ap.add_argument("--root", default=".")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    args = ap.parse_args(argv)
    result = pipeline(args.root, args.overrides, args.name, args.experiment, return_state=True)
    if result.is_failed():
        print(f"pqd-pipeline: failed: {result.message}", file=sys.stderr)
        return 1
    r = result.result()
    print(f"pqd-pipeline: {r.dvc.command} ({r.dvc.seconds:.1f} s); MLflow run {r.run.run_id} "
          f"({'new' if r.run.created else 'already tracked'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
