"""The command-line shell shared by every stage: parse paths, load params, turn user errors into one line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import torch

from pqd.errors import command
from pqd.formats.files import require_folder
from pqd.formats.metrics import StageMetrics
from pqd.params import Params, load_params

# the stage whose output each path option names; for any other stage that option is an input folder,
# checked (present, non-empty) before params are used
MADE_BY = {"model": "model", "trajectories": "generate", "fp_samples": "generate", "calib": "select",
           "qstate": "calibrate", "export": "export"}


def stage_main(name: str, run: Callable[..., StageMetrics], paths: list[str], argv: list[str] | None = None) -> int:
    """Parse ``--params`` and one ``--<path>`` option per entry of ``paths``, validate params, run, write metrics:
    ``run(params, **paths)``'s, with the stage's wall time in ``seconds``. User errors: see :func:`pqd.errors.command`.
    """
    ap = argparse.ArgumentParser(prog=f"python -m pqd.stages.{name}")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", required=True, help="where this stage's metrics JSON goes")
    for p in paths:
        ap.add_argument(f"--{p.replace('_', '-')}", dest=p, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    @command(f"pqd {name}")
    def run_stage() -> int:
        params: Params = load_params(args.params)
        for p in paths:
            if MADE_BY.get(p, name) != name:
                require_folder(getattr(args, p), MADE_BY[p])
        t0 = time.perf_counter()
        metrics = run(params, **{p: Path(getattr(args, p)) for p in paths})
        dataclasses.replace(metrics, seconds=round(time.perf_counter() - t0, 3)).write(args.metrics)
        return 0

    return run_stage()
