"""``pqd-sweep``: bit settings x methods as DVC experiments, one MLflow parent run with a child run per
cell, and one results table (``make sweep`` in docs/operations.md; docs/scaling.md for concurrent cells).

Concurrent cells (``--workers N``, ``--address``) each run in their own clone of the project (:mod:`flows.workspace`)
sharing the DVC cache; the stages every cell shares are computed once first, and each cell's experiment is pushed
back to the project, so the table, the MLflow runs and ``dvc exp show`` are the same as serial. The runner
(:func:`run_cells`) is also the runner of ``make bench`` (:mod:`flows.bench`).
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

from flows.tasks import (MLFLOW_RETRIES, MLFLOW_RETRY_DELAY_S, DvcOutcome, dvc_exp_run, run_dvc, concurrent_env,
                         track_result, validate_params)
from flows.workspace import SWEEP_DIR, prepare_workspace, push_experiment, shared_stages
from pqd.errors import ParamError
from pqd.formats.lineage import git_commit
from pqd.ops import release as pqd_release
from pqd.ops import tracking
from pqd.ops.result import Result
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
    overrides: tuple[str, ...]  # -S key=value, in order
    shared: tuple[str, ...] = ()  # the overrides its model and generate stages see (cells with the same share them)
    labels: tuple[tuple[str, str], ...] = ()  # what the caller tabulates it by, e.g. (("bits", "w4a8"), ...)

    def label(self, key: str) -> str:
        return dict(self.labels)[key]


@dataclass(frozen=True)
class CellResult:
    """A cell's result as its stages wrote it (typed metrics) and the release gate's report on it."""

    cell: Cell
    result: Result
    gate: pqd_release.GateReport
    run_id: str  # its MLflow run
    ran_stages: tuple[str, ...]  # the stages its experiment really ran (the others were skipped or restored)


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
            cells.append(Cell(f"{b}-{method}", (*extra, f"quant.weight_bits={m.group(1)}", f"quant.act_bits={m.group(2)}",
                                                f"calibrate.method={method}"), tuple(extra),
                              (("bits", b), ("method", method))))
    return cells


@task(name="open parent run", retries=MLFLOW_RETRIES, retry_delay_seconds=MLFLOW_RETRY_DELAY_S, cache_policy=NO_CACHE)
def open_parent_run(root: str, experiment: str, name: str, cells: list[Cell], spec: dict[str, str]) -> tracking.TrackedRun:
    """The parent run ``name``, keyed by the cells' overrides, params.yaml and the git commit."""
    key = {"cells": [c.overrides for c in cells], "params": (Path(root) / "params.yaml").read_text(),
           "git": git_commit(Path(root)).commit}
    return tracking.start_parent(root, experiment, name, key, {"sweep.cells": ",".join(c.name for c in cells), **spec})


@task(name="read cell", cache_policy=NO_CACHE)
def read_cell(root: str, cell: Cell, run: tracking.TrackedRun, ran: DvcOutcome) -> CellResult:
    """The workspace's result right after the cell's experiment, and the gate's report on it."""
    r, report = pqd_release.check(root, allow_uncommitted=True)  # a cell is an experiment, not a commit
    return CellResult(cell, r, report, run.run_id, ran.ran_stages)


def table_row(c: CellResult) -> dict[str, Any]:
    """One line of the sweep's table."""
    ev, ex, cal = c.result.metrics.evaluate, c.result.metrics.export, c.result.metrics.calibrate
    failed = [k.name for k in c.gate.checks if not (k.passed or k.waived)]
    return {"cell": c.cell.name, "bits": c.cell.label("bits"), "method": c.cell.label("method"),
            "delta_fid": ev and ev.delta_fid, "noise_floor": ev and ev.noise_floor,
            "fid_quant_vs_fp": ev and ev.fid_quant_vs_fp, "psnr_mean": ev and ev.psnr_mean,
            "size_ratio": ex and ex.size_ratio, "calibrate_s": cal and cal.seconds,
            "gate": "pass" if c.gate.passed else "fail: " + ", ".join(failed), "mlflow_run": c.run_id}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@task(name="write results table", cache_policy=NO_CACHE)
def write_table(root: str, parent: tracking.TrackedRun, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """``data/sweeps/sweep-<id>.md`` and ``.csv``; returns their paths."""
    out = Path(root) / "data" / "sweeps"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"sweep-{parent.result_hash[:8]}"
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


def _cell_tags(cell: Cell, kind: str) -> dict[str, str]:
    return {"pqd.kind": f"{kind}-cell", f"pqd.{kind}.cell": cell.name}


def _serial(root: str, cells: list[Cell], experiment: str, parent: tracking.TrackedRun, restore: bool,
            kind: str) -> list[CellResult]:
    """Each cell in the workspace, one after the other, each from the sweep's params.yaml (``dvc exp run -S`` writes
    into the workspace's file, so a key one cell set would otherwise stay set for the next); the workspace is put
    back afterwards."""
    params_text = (Path(root) / "params.yaml").read_text()
    results = []
    try:
        for c in cells:
            (Path(root) / "params.yaml").write_text(params_text)
            ran = dvc_exp_run(root, list(c.overrides), c.name)
            run = track_result(root, experiment, parent_run_id=parent.run_id, run_name=c.name, tags=_cell_tags(c, kind))
            results.append(read_cell(root, c, run, ran))
    finally:
        if restore:
            restore_workspace(root, params_text)
    return results


def _isolated(root: str, cells: list[Cell], experiment: str, parent: tracking.TrackedRun,
              kind: str) -> list[CellResult]:
    """Each cell in its own workspace, submitted to the flow's task runner (on Dask: one cell per worker); the
    model and generate stages of each group of cells with the same ``shared`` overrides are computed once first."""
    root = str(Path(root).resolve())
    base = Path(root) / SWEEP_DIR / parent.result_hash[:8]
    env = concurrent_env()
    groups = {c.shared: None for c in cells}
    for i, overrides in enumerate(groups):
        groups[overrides] = shared_stages.submit(root, str(base / f"shared-{i}"), list(overrides), SHARED_STAGE, env)
    futures = []
    for c in cells:
        ws = prepare_workspace.submit(root, str(base / c.name), wait_for=[groups[c.shared]])
        ran = dvc_exp_run.submit(ws, list(c.overrides), c.name, env)
        run = track_result.submit(ws, experiment, parent_run_id=parent.run_id, run_name=c.name,
                                  tags=_cell_tags(c, kind), store=root, wait_for=[ran])
        res = read_cell.submit(ws, c, run, ran)
        futures.append((res, push_experiment.submit(ws, c.name, wait_for=[res])))
    results = []
    for res, pushed in futures:
        pushed.result()  # raises when the cell failed at any step
        results.append(res.result())
    return results


def check_cells(root: str, cells: list[Cell]) -> None:
    """Fail before any work when a cell's overrides would be refused by a stage."""
    for c in cells:
        validate_params(root, list(c.overrides))


def run_cells(root: str, cells: list[Cell], experiment: str, parent: tracking.TrackedRun, restore: bool = True,
              isolated: bool = False, kind: str = "sweep") -> list[CellResult]:
    """Every cell as a DVC experiment of the project in ``root`` (``dvc exp run -S ... -n <name>``: stages whose
    params and deps did not change are restored from DVC's run cache), tracked as a child of ``parent`` (tagged
    ``pqd.kind=<kind>-cell``), its result read back: in the workspace one after the other (put back afterwards
    when ``restore``), or (``isolated``) each in its own clone on the flow's task runner (:func:`check_cells`
    first, before opening ``parent``)."""
    return (_isolated(root, cells, experiment, parent, kind) if isolated
            else _serial(root, cells, experiment, parent, restore, kind))


@flow(name="pqd-sweep")
def sweep(root: str = ".", bits: list[str] | None = None, methods: list[str] | None = None,
          overrides: list[str] | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
          restore: bool = True, isolated: bool = False) -> SweepResult:
    """Run every cell of ``bits`` x ``methods`` (plus shared ``overrides``) and tabulate them: in the workspace
    one after the other, or (``isolated``) each in its own workspace on the flow's task runner."""
    extra = list(overrides or [])
    cells = plan(list(bits or DEFAULT_BITS), list(methods or DEFAULT_METHODS), extra)
    check_cells(root, cells)
    bits_, methods_ = (dict.fromkeys(c.label(k) for c in cells) for k in ("bits", "method"))  # ordered sets
    parent = open_parent_run(root, experiment, f"sweep [{', '.join(bits_)}] x [{', '.join(methods_)}]", cells,
                             {"sweep.overrides": " ".join(extra) or "none"})
    rows = [table_row(c) for c in run_cells(root, cells, experiment, parent, restore, isolated)]
    md, csv_file = write_table(root, parent, rows)
    close_sweep_run(root, parent, [md, csv_file])
    return SweepResult(parent.run_id, md, csv_file, tuple(rows))


def on_dask(workers: int = DEFAULT_WORKERS, address: str | None = None, flow_fn=None):
    """``flow_fn`` (default: the sweep flow) on Prefect's DaskTaskRunner: a LocalCluster of ``workers`` processes (one
    cell at a time each), or the running scheduler at ``address``. Call the result with ``isolated=True``."""
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "dashboard_address": "127.0.0.1:8787"})
    return (flow_fn or sweep).with_options(task_runner=runner)


def on_runner(flow_fn, workers: int, address: str | None):
    """(``flow_fn`` on Dask or as it is, whether its cells run isolated) for ``--workers`` / ``--address``; a
    ParamError for a bad value."""
    if workers < 0 or (address and not re.match(r"^(tcp|tls)://[^\s/:]+:\d+$", address)):
        raise ParamError(f"--workers {workers} / --address {address!r} is not allowed: expected --workers >= 0 and "
                         "an address like tcp://10.0.0.5:8786")
    concurrent = bool(address) or workers > 0
    return (on_dask(workers, address, flow_fn) if concurrent else flow_fn), concurrent


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
        flow_fn, concurrent = on_runner(sweep, args.workers, args.address)
    except ParamError as e:
        print(f"pqd-sweep: error: sweep {e}", file=sys.stderr)
        return 2
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
