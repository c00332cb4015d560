"""The command-line shell shared by every stage: parse paths, load params, turn user errors into one line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pqd.io import require_folder, write_json
from pqd.params import Params, ParamError, load_params

# Errors a user can fix: printed as one line, exit status 2, no traceback (PQD_DEBUG=1 shows it).
USER_ERRORS: tuple[type[BaseException], ...] = (ParamError, FileNotFoundError, ValueError, FloatingPointError)


# the stage whose output each path option names; for any other stage that option is an input folder,
# checked (present, non-empty) before params are used
MADE_BY = {"model": "model", "trajectories": "generate", "fp_samples": "generate", "calib": "select",
           "qstate": "calibrate", "export": "export"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from pqd.diffusion.adapter import ModelFolderError
    from pqd.fid import FeatureError

    return USER_ERRORS + (ModelFolderError, FeatureError, ConnectionError)


def stage_main(name: str, run: Callable[..., dict[str, Any]], paths: list[str], argv: list[str] | None = None) -> int:
    """Parse ``--params`` and one ``--<path>`` option per entry of ``paths``, validate params, run, write metrics.

    ``run(params, **paths)`` returns the stage's metrics; they are written to ``--metrics`` with the
    stage's wall time added under ``seconds``.
    """
    ap = argparse.ArgumentParser(prog=f"python -m pqd.stages.{name}")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", required=True, help="where this stage's metrics JSON goes")
    for p in paths:
        ap.add_argument(f"--{p.replace('_', '-')}", dest=p, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    try:
        params: Params = load_params(args.params)
        for p in paths:
            if MADE_BY.get(p, name) != name:
                require_folder(getattr(args, p), MADE_BY[p])
        t0 = time.perf_counter()
        metrics = run(params, **{p: Path(getattr(args, p)) for p in paths})
        metrics = {"seconds": round(time.perf_counter() - t0, 3), **metrics}
    except _user_errors() as e:
        if os.environ.get("PQD_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"pqd {name}: error: {msg}", file=sys.stderr)
        return 2
    write_json(args.metrics, metrics)
    return 0
