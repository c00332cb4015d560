"""The results table `make run` prints shows every headline FID and the PSNR with its interval."""

import re

from pqd.ops.report import main, results_table
from pqd.ops.result import read_result
from support.projects import reproduced_project


def test_results_table_shows_intervals(tmp_path_factory, tiny_pipeline, ts_features, capsys):
    project = reproduced_project(tmp_path_factory, tiny_pipeline, ts_features)
    r = read_result(project)
    table = results_table(r)
    ev = r.metrics.evaluate
    row = next(line for line in table.splitlines() if line.startswith("| delta FID"))
    lo, hi = (float(x) for x in re.search(r"\[(-?[\d.]+), (-?[\d.]+)\]", row).groups())
    assert (lo, hi) == (round(ev.delta_fid_ci.lo, 3), round(ev.delta_fid_ci.hi, 3))
    for name in ("FID FP vs reference", "FID quantized vs reference", "FID quantized vs FP samples", "PSNR vs FP"):
        assert re.search(rf"^\| {name}[^|]*\| -?[\d.]+ \[", table, re.M), name
    # the runtime whose deployed graphs were scored (evaluate.backend) names the deployed-vs-simulated row
    runtime = ev.protocol.backend.split(" ", 1)[0]
    assert runtime in ("onnxruntime", "openvino") and f"| FID deployed ({runtime}) vs simulated |" in table
    assert "| intervals [lo, hi] | 0.95 normal, jackknife bias-corrected (25 groups), sd of 200 bootstrap resamples" in table
    assert main([str(project)]) == 0 and capsys.readouterr().out.strip() == table
