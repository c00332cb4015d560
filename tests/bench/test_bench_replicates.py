"""make bench through the sweep's runner on the operations project (the tiny random pipeline): each cell a DVC
experiment named <model>-r<k>-<row>, replicates vary the seeds a user does not control, every number gets an
interval, rows are compared in pairs, and a rerun restores every stage from DVC's run cache."""

import pandas as pd
import pytest
import yaml

from flows.tasks import run_dvc
from pqd.bench import plan
from pqd.errors import ParamError
from support.projects import ROOT, clone, reproduced_project

ROWS = ["w8-pqd", "w8-minmax"]  # a paired comparison; w8-minmax of replicate 0 is the project's own result
# the runner is under test, not the deployed graphs (tests/deploy, tests/e2e): no ONNX export, simulated FID
FAST = ["export.onnx=false", "evaluate.backend=torch"]


def test_plan_names_cells_and_moves_the_replicates_seeds():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    cells = plan.plan(base, ["demo:digits16"], ["w4-pqd-uniform-steps"], 2, ["generate.eval_samples=64"])
    assert [c.name for c in cells] == ["digits16-r0-w4-pqd-uniform-steps", "digits16-r1-w4-pqd-uniform-steps"]
    o = dict(x.split("=", 1) for x in cells[1].overrides)
    assert (o["model.source"], o["model.channels"], o["generate.eval_samples"]) == ("demo:digits16", "[32,64]", "64")
    assert (o["model.seed"], o["generate.calib_seed_base"], o["select.seed"]) == ("1", "1001000000", "1")
    assert (o["calibrate.time_groups"], o["quant.weight_bits"], o["select.timesteps"]) == ("null", "4", "uniform")
    assert cells[1].shared == cells[1].overrides[:len(cells[1].shared)] and "select.timesteps=uniform" not in cells[1].shared
    assert plan.row_names("shared")[:2] == ["w8-pqd-previous-defaults", "w8-pqd-no-shortcut-split-all-glue-attention-matmuls"]
    # a row that switches a graph setting on is built over the previous defaults and compared with them; w8-pqd is
    # the defaults, every fast setting at once
    assert plan.comparison_pairs(plan.row_names("fast")) == [("w8-pqd-previous-defaults", "w8-pqd")]
    assert ("w8-pqd-symmetric-activation-grids", "w8-pqd-previous-defaults") in plan.comparison_pairs(
        plan.row_names("symmetric"))
    sym = dict(x.split("=", 1) for x in plan.plan(base, ["demo:digits"], ["w8-pqd-symmetric-activation-grids"], 1)[0].overrides)
    assert (sym["quant.glue"], sym["calibrate.split_shortcut"], sym["quant.act_symmetric"]) == ("[]", "true", "true")
    with pytest.raises(ParamError, match="bench: --rows '3' is not allowed: expected a row set"):
        plan.row_names("3,0")
    with pytest.raises(ParamError, match="--replicates 0 is not allowed"):
        plan.plan(base, ["demo:digits"], ROWS, 0)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.mark.slow  # real flow runs (Prefect, dvc exp run): make test-fast leaves them out
def test_bench_over_two_replicates_then_a_rerun_restores_every_stage(harness, tmp_path, tmp_path_factory,
                                                                      tiny_pipeline, ts_features):
    from flows.bench import bench

    project = clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path / "p")
    source, params_before = str(tiny_pipeline), (project / "params.yaml").read_text()
    first = bench(str(project), models=[source], rows=ROWS, replicates=2, overrides=FAST)
    ran = dict(zip(first.cells, first.ran_stages))
    # replicate 0 shares the project's model and generate stages; replicate 1 (model.seed 1, calibration seeds
    # + 10^6) runs them once, for its first row; the rows reset the method keys the project set (select.mu, ...)
    for cell in ("pipe-r0-w8-pqd", "pipe-r0-w8-minmax", "pipe-r1-w8-minmax"):
        assert "model" not in ran[cell] and "generate" not in ran[cell] and "calibrate" in ran[cell], (cell, ran[cell])
    assert ran["pipe-r1-w8-pqd"][:2] == ("model", "generate")
    out = project / "data/bench"
    reps = pd.read_csv(out / "bench_replicates.csv")
    assert sorted(zip(reps["replicate"], reps["key"])) == [(0, "w8-minmax"), (0, "w8-pqd"), (1, "w8-minmax"), (1, "w8-pqd")]
    # the stages' own metric names, and the gate's statistics as pqd.ops.release computes them
    assert {"evaluate.fid_quant_vs_fp", "evaluate.delta_fid_ci.hi", "export.size_ratio", "gate.psnr_margin_db"} <= set(reps)
    assert reps["gate.delta_fid_fraction"].tolist() == pytest.approx(
        (reps["evaluate.delta_fid_ci.hi"] / reps["evaluate.fid_fp_vs_ref"]).tolist())
    line = pd.read_csv(out / "bench.csv").set_index("row").loc["pqd"]
    vals = reps[reps["key"] == "w8-pqd"]["evaluate.fid_quant_vs_fp"]
    assert line["n"] == 2 and line["evaluate.fid_quant_vs_fp"] == pytest.approx(vals.mean())
    assert line["evaluate.fid_quant_vs_fp_lo"] < line["evaluate.fid_quant_vs_fp"] < line["evaluate.fid_quant_vs_fp_hi"]
    paired = pd.read_csv(out / "bench_paired.csv").set_index("metric")
    by_rep = reps.pivot(index="replicate", columns="key", values="evaluate.psnr_mean")
    assert paired.loc["evaluate.psnr_mean", "diff"] == pytest.approx((by_rep["w8-pqd"] - by_rep["w8-minmax"]).mean())
    md = (out / "bench.md").read_text()
    assert "t-interval over R replicates" in md and "| pqd W8A8 | minmax W8A8 | 2 |" in md.replace("W7A8", "W8A8")
    assert all((out / f).is_file() for f in ("bench.png", "bench_paired.png", "bench_frontier.png"))
    # the workspace is put back; each cell is an experiment
    assert (project / "params.yaml").read_text() == params_before
    assert set(first.cells) <= set(run_dvc(project, ["exp", "list", "--name-only"]).output.split())
    # a rerun of the same cells recomputes nothing: every stage restored from DVC's run cache
    again = bench(str(project), models=[source], rows=ROWS, replicates=2, overrides=FAST)
    assert again.cells == first.cells and again.ran_stages == ((),) * 4
    keep = ["evaluate.fid_quant_vs_fp", "evaluate.delta_fid", "evaluate.psnr_mean", "export.size_ratio"]
    assert pd.read_csv(out / "bench_replicates.csv")[keep].equals(reps[keep])

