"""``make bench``: named rows x models x replicates as DVC experiments of this project, run by the sweep's runner
(:func:`flows.sweep.run_cells`), with intervals over replicates and paired verdicts.

The cells come from :mod:`pqd.bench.plan`. DVC's run cache does all caching: every row of a replicate restores the
model and generate stages the first row computed, and a cell run before is restored, so adding a row or a replicate
computes only what is new. :mod:`pqd.bench.report` writes the tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from flows.sweep import Cell, check_cells, close_sweep_run, on_runner, open_parent_run, run_cells
from pqd.bench import plan as bench_plan
from pqd.bench import report
from pqd.errors import ParamError
from pqd.ops import tracking
from pqd.ops.result import BENCH_DIR
from pqd.params import as_dict, read_yaml

STAGES_ONCE = ("model", "generate")  # computed once per model and replicate, restored for its other rows


@dataclass(frozen=True)
class BenchResult:
    parent_run_id: str
    table_md: str
    cells: tuple[str, ...]
    ran_stages: tuple[tuple[str, ...], ...]  # per cell, the stages its experiment really ran


def _cells(cells: list[bench_plan.BenchCell]) -> list[Cell]:
    return [Cell(c.name, c.overrides, c.shared, (("model", c.model), ("replicate", str(c.replicate)), ("row", c.row)))
            for c in cells]


@flow(name="pqd-bench")
def bench(root: str = ".", models: list[str] | None = None, rows: list[str] | None = None, replicates: int = 3,
          overrides: list[str] | None = None, out: str = BENCH_DIR, experiment: str = tracking.DEFAULT_EXPERIMENT,
          restore: bool = True, isolated: bool = False) -> BenchResult:
    """Run every cell of ``models`` x ``rows`` x ``replicates`` (plus shared ``overrides``) and write the report."""
    t0 = time.perf_counter()
    models, rows = list(models or bench_plan.DEFAULT_MODELS), list(rows or bench_plan.DEFAULT_ROWS)
    planned = bench_plan.plan(read_yaml(Path(root) / "params.yaml"), models, rows, replicates, overrides)
    cells = _cells(planned)
    check_cells(root, cells)
    parent = open_parent_run(root, experiment, f"bench [{', '.join(models)}] x [{', '.join(rows)}] x {replicates}",
                             cells, {"sweep.overrides": " ".join(overrides or []) or "none"})
    results = run_cells(root, cells, experiment, parent, restore, isolated, kind="bench")
    lines = [report.cell_line(c.model, c.replicate, c.row, r.result) for c, r in zip(planned, results)]
    once = {(x["model"], x["replicate"]): sum(x.get(f"{s}.seconds", 0.0) for s in STAGES_ONCE) for x in lines}
    rest = sum(v for x in lines for k, v in x.items() if k.endswith(".seconds") and k.split(".")[0] not in STAGES_ONCE)
    times = {"this run's wall time": time.perf_counter() - t0,
             "compute time of every result shown (the stages' own seconds, as first computed)": sum(once.values()) + rest}
    p = results[0].result.params
    md = report.write_outputs(lines, rows, Path(root) / out, p.evaluate.confidence, as_dict(p.release), times)
    close_sweep_run(root, parent, [str(Path(root) / out / "bench.md"), str(Path(root) / out / "bench.csv")])
    return BenchResult(parent.run_id, md, tuple(c.name for c in cells), tuple(r.ran_stages for r in results))


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.bench [--models ...] [--rows NAMES|SET] [--replicates R] [-S key=value ...]``."""
    ap = argparse.ArgumentParser(prog="python -m flows.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(bench_plan.DEFAULT_MODELS), help="comma-separated model.source values")
    ap.add_argument("--rows", default="", help=f"a row set ({', '.join(bench_plan.ROW_SETS)}) or comma-separated row "
                                               "names (--list-rows); default: the methods and the ablations")
    ap.add_argument("--list-rows", action="store_true", help="print the row names and what each sets, and exit")
    ap.add_argument("--replicates", type=int, default=3, help="R: replicates 0..R-1 (default 3)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="section.key=value over params.yaml for every cell (repeatable)")
    ap.add_argument("--root", default=".")
    ap.add_argument("--out", default=BENCH_DIR, help=f"the report's folder under --root (default {BENCH_DIR})")
    ap.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT, help="MLflow experiment")
    ap.add_argument("--no-restore", dest="restore", action="store_false",
                    help="serial: leave the last cell's result in the workspace")
    ap.add_argument("--workers", type=int, default=0, help="cells at once on a Dask LocalCluster of this many "
                                                           "processes; 0 (default): one after the other in the workspace")
    ap.add_argument("--address", help="a running Dask scheduler (tcp://host:port) to run the cells on")
    args = ap.parse_args(argv)
    if args.list_rows:
        for name, row in bench_plan.ROWS.items():
            print(f"{name:<66} {row.label} W{row.bits}: {row.settings}")
        return 0
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        rows = bench_plan.row_names(args.rows)
        bench_plan.plan(read_yaml(Path(args.root) / "params.yaml"), split(args.models), rows, args.replicates,
                        args.overrides)
        flow_fn, concurrent = on_runner(bench, args.workers, args.address)
    except ParamError as e:
        print(f"pqd-bench: error: {e}", file=sys.stderr)
        return 2
    state = flow_fn(args.root, split(args.models), rows, args.replicates, args.overrides, args.out, args.experiment,
                    args.restore, concurrent, return_state=True)
    if state.is_failed():
        print(f"pqd-bench: failed: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    print(result.table_md)
    print(f"pqd-bench: report {Path(args.root) / args.out / 'bench.md'}; MLflow parent run {result.parent_run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
