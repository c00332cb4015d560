"""make bench end to end on the reduced demo: replicates vary the seeds a user does not control, every number gets
an interval, rows are compared in pairs, and the cache reruns only what is new."""

import json

import pandas as pd
import pytest
import yaml

from pqd.bench import methods
from support.projects import small_params

pytestmark = pytest.mark.slow  # trains and calibrates the demo twice over

ROW_PQD, ROW_UNIFORM = 7, 8  # PQD at W4A8, and PQD with uniform steps: a paired comparison


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    params = d / "params.yaml"
    params.write_text(yaml.safe_dump(small_params(model={"train_steps": 20, "feature_epochs": 1, "batch_size": 32},
                                                  generate={"steps": 8, "eval_samples": 24, "batch_size": 24},
                                                  select={"num_samples": 32}, )))
    argv = ["--params", str(params), "--out", str(d / "out"), "--models", "demo:digits", "--replicates", "2"]
    assert methods.main([*argv, "--rows", str(ROW_PQD)]) == 0
    first = {f: f.stat().st_mtime_ns for f in (d / "out").rglob(methods.KEY_FILE)}
    assert methods.main([*argv, "--rows", f"{ROW_PQD},{ROW_UNIFORM}"]) == 0
    return d / "out", first


def test_replicates_vary_model_and_calibration_seeds(bench):
    out, _ = bench
    r0, r1 = (out / "digits" / f"r{k}" / "fp" for k in (0, 1))
    assert json.loads((r0 / "model/model.json").read_text())["model_sha256"] != \
        json.loads((r1 / "model/model.json").read_text())["model_sha256"]  # model.seed 0 and 1
    seeds = [pd.read_parquet(r / "trajectories/index.parquet")["seed"].min() for r in (r0, r1)]
    assert seeds == [1_000_000_000, 1_000_000_000 + methods.REPLICATE_SEED_STRIDE]
    # the evaluation seeds do not vary: every row of every replicate is compared with FP images of seeds 0..23
    for r in (r0, r1):
        assert json.loads((r / "samples/fp/meta.json").read_text())["sets"]["a"] == {"seed_base": 0, "count": 24}
    # the digit features are the same instrument in both replicates (model.feature_seed)
    f0, f1 = ((r / "model/fid_features/model.safetensors").read_bytes() for r in (r0, r1))
    assert f0 == f1


def test_adding_a_row_runs_only_that_row(bench):
    out, first = bench
    now = {f: f.stat().st_mtime_ns for f in out.rglob(methods.KEY_FILE)}
    assert {f: now[f] for f in first} == first  # the FP outputs and the first row of both replicates were reused
    new = sorted(str(f.relative_to(out).parent) for f in set(now) - set(first))
    assert new == ["digits/r0/w4-pqd-uniform-steps", "digits/r1/w4-pqd-uniform-steps"]


def test_tables_carry_intervals_and_paired_verdicts(bench):
    out, _ = bench
    reps = pd.read_csv(out / "bench_replicates.csv")
    assert sorted(zip(reps["replicate"], reps["key"])) == [(0, "w4-pqd"), (0, "w4-pqd-uniform-steps"),
                                                           (1, "w4-pqd"), (1, "w4-pqd-uniform-steps")]
    line = pd.read_csv(out / "bench.csv").iloc[0]
    vals = reps[reps["key"] == "w4-pqd"]["fid_vs_fp"]
    assert (line["row"], line["n"]) == ("pqd", 2) and line["fid_vs_fp"] == pytest.approx(vals.mean())
    assert line["fid_vs_fp_lo"] < line["fid_vs_fp"] < line["fid_vs_fp_hi"]
    assert line["fid_vs_fp_boot_lo"] <= line["fid_vs_fp_boot_hi"]
    # the paired difference is the mean of the per-replicate differences
    paired = pd.read_csv(out / "bench_paired.csv").set_index("metric")
    by_rep = reps.pivot(index="replicate", columns="key", values="psnr_db")
    assert paired.loc["psnr_db", "diff"] == pytest.approx((by_rep["w4-pqd-uniform-steps"] - by_rep["w4-pqd"]).mean())
    assert set(paired["verdict"]) <= {"better", "worse", "no difference shown"} and (paired["n"] == 2).all()
    md = (out / "bench.md").read_text()
    assert "t-interval over R replicates" in md and "Partial" not in md
    assert "| pqd, uniform steps W4A8 | pqd W4A8 | 2 |" in md
    assert (out / "bench.png").is_file() and (out / "bench_paired.png").is_file()
