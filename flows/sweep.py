"""``pqd-sweep``: bit settings x methods as DVC experiments, one MLflow parent run with a child run per
cell, and one results table.

Each cell is ``dvc exp run -S quant.weight_bits=W -S quant.act_bits=A -S calibrate.method=M -n wWaA-M``
(stages whose inputs did not change are skipped or restored from DVC's run cache), tracked right after
as a child of the sweep's parent run. The table (markdown + CSV) goes to ``data/sweeps/`` and to the parent
run. Pick a cell later with ``dvc exp apply <cell>``. Re-running the same sweep on the same commit reuses the
parent run and every child whose result did not change.

Serial (``--workers 0``): cells run one after the other in the workspace, which is put back afterwards
(params.yaml as it was, ``dvc repro`` from the run cache). Concurrent (``--workers N``: a Dask LocalCluster
of N processes; ``--address tcp://host:port``: a running Dask scheduler): Prefect's DaskTaskRunner runs each
cell in its own clone of the project at its commit (:mod:`flows.workspace`), sharing the DVC cache; the
stages every cell shares are computed once first, and each cell's experiment is pushed back to the project.
The workspace is never touched; the table, the MLflow runs and ``dvc exp show`` are the same as serial.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.tasks import (MLFLOW_RETRIES, MLFLOW_RETRY_DELAY_S, DvcOutcome, dvc_exp_run, run_dvc, thread_env,
                         track_result, validate_params)
from flows.workspace import SWEEP_DIR, prepare_workspace, push_experiment, shared_stages
from pqd.errors import ParamError
from pqd.formats.lineage import git_commit
from pqd.ops import release as pqd_release
from pqd.ops import tracking
from pqd.params.methods import METHODS

DEFAULT_BITS = ("w8a8", "w4a8")
DEFAULT_METHODS = ("minmax", "pqd")
DEFAULT_WORKERS = 2
SHARED_STAGE = "generate"  # model and generate read no parameter a cell sets (select reads calibrate.method)
COLUMNS = ("cell", "bits", "method", "delta_fid", "noise_floor", "fid_quant_vs_fp", "psnr_mean", "size_ratio",
           "calibrate_s", "gate", "mlflow_run")
_BITS = re.compile(r"^w([2-8])a([4-8])$")


@dataclass(frozen=True)
class Cell:
    name: str  # also the DVC experiment name, e.g. w4a8-pqd
    bits: str
    method: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class SweepResult:
    parent_run_id: str
    table_md: str
    table_csv: str
    rows: tuple[dict[str, Any], ...]


def plan(bits: list[str], methods: list[str], extra: list[str]) -> list[Cell]:
    """The cells of the matrix, in order; one-line ParamError for a bad bit setting or method."""
    cells = []
    for b in bits:
        m = _BITS.match(b)
        if not m:
            raise ParamError(f"sweep bits {b!r} is not allowed: expected wWaA with W in 2..8 and A in 4..8, e.g. w4a8")
        for method in methods:
            if method not in METHODS:
                raise ParamError(f"sweep method {method!r} is not allowed: expected one of {', '.join(METHODS)}")
            cells.append(Cell(f"{b}-{method}", b, method, (*extra, f"quant.weight_bits={m.group(1)}",
                                                             f"quant.act_bits={m.group(2)}", f"calibrate.method={method}")))
    return cells


@task(name="open sweep run", retries=MLFLOW_RETRIES, retry_delay_seconds=MLFLOW_RETRY_DELAY_S, cache_policy=NO_CACHE)
def open_sweep_run(root: str, experiment: str, cells: list[Cell], extra: list[str]) -> tracking.TrackedRun:
    """The parent run, keyed by the cells, the shared overrides, params.yaml and the git commit."""
    key = {"cells": [c.overrides for c in cells], "params": (Path(root) / "params.yaml").read_text(),
           "git": git_commit(Path(root)).commit}
    bits, methods = dict.fromkeys(c.bits for c in cells), dict.fromkeys(c.method for c in cells)  # ordered sets
    name = f"sweep [{', '.join(bits)}] x [{', '.join(methods)}]"
    spec = {"sweep.cells": ",".join(c.name for c in cells), "sweep.overrides": " ".join(extra) or "none"}
    return tracking.start_parent(root, experiment, name, key, spec)


@task(name="read cell", cache_policy=NO_CACHE)
def cell_row(root: str, cell: Cell, run: tracking.TrackedRun) -> dict[str, Any]:
    """One table row from the workspace's result right after the cell's experiment."""
    r, report = pqd_release.check(root, allow_uncommitted=True)  # a cell is an experiment, not a commit
    ev, ex, cal = r.metrics.evaluate, r.metrics.export, r.metrics.calibrate
    failed = [c.name for c in report.checks if not (c.passed or c.waived)]
    return {"cell": cell.name, "bits": cell.bits, "method": cell.method, "delta_fid": ev and ev.delta_fid,
            "noise_floor": ev and ev.noise_floor, "fid_quant_vs_fp": ev and ev.fid_quant_vs_fp,
            "psnr_mean": ev and ev.psnr_mean, "size_ratio": ex and ex.size_ratio, "calibrate_s": cal and cal.seconds,
            "gate": "pass" if report.passed else "fail: " + ", ".join(failed), "mlflow_run": run.run_id}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@task(name="write results table", cache_policy=NO_CACHE)
def write_table(root: str, parent: tracking.TrackedRun, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """``data/sweeps/sweep-<id>.md`` and ``.csv``; returns their paths."""
    out = Path(root) / "data" / "sweeps"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"sweep-{parent.fingerprint[:8]}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {parent.name}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return str(stem.with_suffix(".md")), str(stem.with_suffix(".csv"))


@task(name="close sweep run", retries=MLFLOW_RETRIES, retry_delay_seconds=MLFLOW_RETRY_DELAY_S, cache_policy=NO_CACHE)
def close_sweep_run(root: str, parent: tracking.TrackedRun, files: list[str]) -> None:
    tracking.finish_parent(root, parent.run_id, [Path(f) for f in files])


@task(name="restore workspace", cache_policy=NO_CACHE)
def restore_workspace(root: str, params_text: str) -> DvcOutcome:
    """params.yaml as before the sweep, and its result back from DVC's run cache (``dvc repro``)."""
    (Path(root) / "params.yaml").write_text(params_text)
    return run_dvc(root, ["repro"], get_run_logger().info)


def _cell_tags(cell: Cell) -> dict[str, str]:
    return {"pqd.kind": "sweep-cell", "pqd.sweep.cell": cell.name}


def _serial(root: str, cells: list[Cell], experiment: str, parent: tracking.TrackedRun, restore: bool) -> list[dict]:
    """Each cell in the workspace, one after the other; the workspace is put back afterwards."""
    params_text = (Path(root) / "params.yaml").read_text()
    rows = []
    try:
        for c in cells:
            dvc_exp_run(root, list(c.overrides), c.name)
            run = track_result(root, experiment, parent_run_id=parent.run_id, run_name=c.name, tags=_cell_tags(c))
            rows.append(cell_row(root, c, run))
    finally:
        if restore:
            restore_workspace(root, params_text)
    return rows


def _isolated(root: str, cells: list[Cell], extra: list[str], experiment: str,
              parent: tracking.TrackedRun) -> list[dict]:
    """Each cell in its own workspace, submitted to the flow's task runner (on Dask: one cell per worker)."""
    base = Path(root).resolve() / SWEEP_DIR / parent.fingerprint[:8]
    env = thread_env()
    shared = shared_stages.submit(str(Path(root).resolve()), str(base / "shared"), extra, SHARED_STAGE, env)
    futures = []
    for c in cells:
        ws = prepare_workspace.submit(str(Path(root).resolve()), str(base / c.name), wait_for=[shared])
        ran = dvc_exp_run.submit(ws, list(c.overrides), c.name, env)
        run = track_result.submit(ws, experiment, parent_run_id=parent.run_id, run_name=c.name, tags=_cell_tags(c),
                                  store=str(Path(root).resolve()), wait_for=[ran])
        row = cell_row.submit(ws, c, run)
        futures.append((row, push_experiment.submit(ws, c.name, wait_for=[row])))
    rows = []
    for row, pushed in futures:
        pushed.result()  # raises when the cell failed at any step
        rows.append(row.result())
    return rows


@flow(name="pqd-sweep")
def sweep(root: str = ".", bits: list[str] | None = None, methods: list[str] | None = None,
          overrides: list[str] | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
          restore: bool = True, isolated: bool = False) -> SweepResult:
    """Run every cell of ``bits`` x ``methods`` (plus shared ``overrides``) and tabulate them: in the workspace
    one after the other, or (``isolated``) each in its own workspace on the flow's task runner."""
    extra = list(overrides or [])
    cells = plan(list(bits or DEFAULT_BITS), list(methods or DEFAULT_METHODS), extra)
    for c in cells:
        validate_params(root, list(c.overrides))
    parent = open_sweep_run(root, experiment, cells, extra)
    rows = (_isolated(root, cells, extra, experiment, parent) if isolated
            else _serial(root, cells, experiment, parent, restore))
    md, csv_file = write_table(root, parent, rows)
    close_sweep_run(root, parent, [md, csv_file])
    return SweepResult(parent.run_id, md, csv_file, tuple(rows))


def on_dask(workers: int = DEFAULT_WORKERS, address: str | None = None):
    """The sweep flow on Prefect's DaskTaskRunner: a LocalCluster of ``workers`` processes (one cell at a time
    each), or the running scheduler at ``address``. Call the result like :func:`sweep`, with ``isolated=True``."""
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "dashboard_address": "127.0.0.1:8787"})
    return sweep.with_options(task_runner=runner)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.sweep [--bits w8a8,w4a8] [--methods minmax,pqd] [-S key=value ...]``."""
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default=",".join(DEFAULT_BITS), help="comma-separated wWaA settings")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every cell (e.g. a reduced config)")
    ap.add_argument("--root", default=".")
    ap.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT, help="MLflow experiment")
    ap.add_argument("--no-restore", dest="restore", action="store_false",
                    help="serial: leave the last cell's result in the workspace")
    ap.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                    help=f"cells at once on a Dask LocalCluster of this many processes (default {DEFAULT_WORKERS}); "
                         "0: one after the other in the workspace")
    ap.add_argument("--address", help="a running Dask scheduler (tcp://host:port) to run the cells on")
    args = ap.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        plan(split(args.bits), split(args.methods), args.overrides)
        if args.workers < 0 or (args.address and not re.match(r"^(tcp|tls)://[^\s/:]+:\d+$", args.address)):
            raise ParamError(f"sweep --workers {args.workers} / --address {args.address!r} is not allowed: expected "
                             "--workers >= 0 and an address like tcp://10.0.0.5:8786")
    except ParamError as e:
        print(f"pqd-sweep: error: {e}", file=sys.stderr)
        return 2
    concurrent = bool(args.address) or args.workers > 0
    flow_fn = on_dask(args.workers, args.address) if concurrent else sweep
    state = flow_fn(args.root, split(args.bits), split(args.methods), args.overrides, args.experiment, args.restore,
                    concurrent, return_state=True)
    if state.is_failed():
        print(f"pqd-sweep: failed: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    print(Path(result.table_md).read_text())
    print(f"pqd-sweep: table {result.table_md}; MLflow parent run {result.parent_run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
