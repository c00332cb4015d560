"""make bench-calibrate: real calibrate runs of two tiny models give the per-unit rows, the fits and the table; its
cost-model arithmetic against hand-computed values; bad arguments refused in one line before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch.nn as nn

from pqd.bench.calibrate import main, target_costs
from pqd.bench.costfit import eval_share, least_squares
from pqd.diffusion.demo import build_demo_unet


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "calibrate.json"
    assert main(["--models", "demo:digits", "demo:digits-dit", "--samples", "8", "--recon-iters", "1",
                 "--linearity-model", "demo:digits", "--linearity-iters", "3", "--reference", "demo:digits",
                 "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


@pytest.mark.slow  # three calibrate runs in child processes
def test_runs_record_every_unit_of_each_model(bench):
    _, result = bench
    digits, dit = result["runs"]
    assert (digits["model"], dit["model"]) == ("demo:digits", "demo:digits-dit")
    assert digits["calib_inputs"] == 8 and dit["calib_inputs"] == 16  # the DiT's inputs enter twice (guidance 1.5)
    # every Conv2d / Linear weight of the demo UNet belongs to exactly one reconstruction unit
    unet = build_demo_unet()
    weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert sum(u["parameters"] for u in digits["unit_log"]) == weights
    assert digits["units"] == len(digits["unit_log"]) > 0 and dit["units"] == len(dit["unit_log"]) > 0
    conv_in = next(u for u in digits["unit_log"] if u["unit"] == "conv_in")
    # conv_in (1 -> 32 channels, 3x3, 8x8): input 1x8x8 + output 32x8x8 float32 per calibration input; 2 FLOPs a MAC
    assert conv_in["io_bytes"] == 8 * (1 + 32) * 64 * 4
    assert conv_in["flops_per_input"] == 2 * 32 * 1 * 9 * 64
    for r in (digits, dit):
        assert all(u["seconds"] > 0 for u in r["unit_log"])
        assert 0 < r["unit_seconds"] <= r["reconstruction_seconds"] + 0.01 and r["fit_seconds"] < r["total_seconds"]
        assert r["peak_rss_mb"] > 100
    lin = result["linearity_run"]
    assert (lin["model"], lin["recon_iters"], result["eval_share"]["iters"]) == ("demo:digits", 3, [1, 3])


@pytest.mark.slow
def test_fit_table_and_plot_come_from_the_runs(bench):
    out, result = bench
    f = result["fit"]
    assert f["units"] == sum(r["units"] for r in result["runs"])
    assert set(f["overhead"]) == {"demo:digits", "demo:digits-dit"}
    assert set(f["log_slopes"]) == {"parameters", "io_bytes", "flops"}
    for key in ("io_bytes", "flops"):
        g = f["per_step"][key]
        assert g["r2"] <= 1 and set(g["held_out"]) == {"demo:digits", "demo:digits-dit"}
        # the held-out "measured" step seconds are the run's unit seconds over (iters + phi x N / rows)
        for r in result["runs"]:
            k = r["recon_iters"] + f["phi"] * r["calib_inputs"] / r["rows_per_step"]
            # (from the unit log: the run's "unit_seconds" is rounded to 1 ms, too coarse for a 0.2 s total)
            measured = sum(u["seconds"] for u in r["unit_log"]) / k
            assert g["held_out"][r["model"]]["measured"] == pytest.approx(measured, rel=1e-9)
    md = out.with_suffix(".md").read_text()
    for r in result["runs"]:
        assert f"| {r['model']} | {r['parameters']:,} | {r['calib_inputs']} | {r['rows_per_step']:.1f} | " \
               f"{r['recon_iters']} | {r['units']} | {r['fit_seconds']:.1f} | {r['reconstruction_seconds']:.1f} | " \
               f"{r['total_seconds']:.1f} |" in md
    sd, pixart = result["extrapolation"]
    assert (sd["parameters"], pixart["parameters"]) == (859_520_964, 610_856_096)
    assert sd["calib_inputs"] == pixart["calib_inputs"] == 2 * 512 and sd["recon_iters"] == 300
    for key in ("io_bytes", "flops"):
        lo, hi = sd[key]["total_seconds_range"]
        assert lo <= sd[key]["total_seconds"] <= hi
    if result["plot"]:
        assert out.with_suffix(".png").stat().st_size > 1000


def test_least_squares_and_eval_share_against_hand_computed_values():
    x = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 5.0], [3.0, 1.0]])
    coef, r2 = least_squares(x, 2 + 3 * x[:, 0] - 0.5 * x[:, 1])
    assert np.allclose(coef, [2, 3, -0.5]) and r2 == pytest.approx(1.0)
    # two units at 10 and 30 iterations: seconds = iters x step + fixed, steps 0.1 and 0.3, fixed 0.5 and 0.7
    run = lambda it: {"model": "m", "recon_iters": it, "calib_inputs": 64, "rows_per_step": 32,  # noqa: E731
                      "unit_seconds": 0.0, "unit_log": [{"unit": "a", "seconds": it * 0.1 + 0.5},
                                                        {"unit": "b", "seconds": it * 0.3 + 0.7}]}
    share = eval_share(run(10), run(30))
    assert share["step_seconds_all_units"] == pytest.approx(0.4)
    assert share["fixed_seconds_all_units"] == pytest.approx(1.2)
    assert share["phi"] == pytest.approx(1.2 / (0.4 * 64 / 32))


def test_sd15_target_units_cover_its_layers():
    params, branches, costs = target_costs("sd-1.5-unet")
    assert params == 859_520_964 and branches == 2 and len(costs) == 48
    # the attention transformers of the 320-channel level: the costliest units per input
    assert max(costs, key=lambda u: costs[u].flops).startswith(("down_blocks.0.attentions", "up_blocks.3.attentions"))


@pytest.mark.parametrize("args, message", [
    (["--models", "demo:digits", "sd-xl"], "unknown model 'sd-xl'"),
    (["--recon-iters", "0"], "--recon-iters 0: expected a positive integer"),
    (["--samples", "-3"], "--samples -3: expected a positive integer"),
    (["--linearity-iters", "10"], "--linearity-iters 10: expected 0 (off) or more than --recon-iters 20"),
    (["--model-samples", "cifar10-ddpm=0"], "--model-samples 'cifar10-ddpm=0': expected MODEL=N"),
    (["--model-samples", "sd-xl=8"], "unknown model 'sd-xl'"),
    (["--models", "demo:digits", "--reference", "cifar10-ddpm"], "--reference 'cifar10-ddpm': expected one of"),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "calibrate.json"
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(out)])
    assert str(e.value).startswith("bench-calibrate: error: ") and message in str(e.value)
    assert "\n" not in str(e.value) and not out.exists()


def test_the_command_line_refuses_in_one_line(tmp_path):
    out = tmp_path / "calibrate.json"
    r = subprocess.run([sys.executable, "-m", "pqd.bench.calibrate", "--models", "sd-xl", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "bench-calibrate: error: unknown model 'sd-xl': expected one of demo:digits, demo:digits16, demo:digits-dit, "
        "cifar10-ddpm"]
    assert not out.exists()
