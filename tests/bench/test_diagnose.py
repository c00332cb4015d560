"""``python -m pqd.bench.diagnose``'s probe of where a quantized model's error reaches the image, on a reproduced
project (a real FP model, its evaluation protocol and its W8A8 export), and the sampler's step swap it rests on."""

import pandas as pd
import pytest

from support.projects import reproduced_project
from pqd.bench import diagnose
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.quantized import load_denoiser_from_export
from pqd.diffusion.sampling import sample, scheduler_from_protocol
from pqd.formats.files import load_tensors, read_json


@pytest.fixture()
def data(tmp_path_factory, tiny_pipeline, ts_features):
    return reproduced_project(tmp_path_factory, tiny_pipeline, ts_features) / "data"


def test_image_error_by_steps_splits_the_quantized_model_s_image_error_over_buckets_of_steps(data):
    proto = read_json(data / "samples/fp/meta.json")
    steps, seeds = int(proto["steps"]), 3
    df = diagnose.image_error_by_steps(data, {"q": data, "again": data}, seeds=seeds, bucket=4)
    # the same export under two names: the same numbers (the FP images are sampled once for both)
    assert df[df["row"] == "q"].drop(columns="row").reset_index(drop=True).equals(
        df[df["row"] == "again"].drop(columns="row").reset_index(drop=True))
    df = df[df["row"] == "q"]
    buckets = df[~df["steps"].isin(["all", "sum of buckets"])]
    assert list(buckets["steps"]) == [f"{b}-{min(b + 4, steps) - 1}" for b in range(0, steps, 4)]
    assert (buckets["image_mse"] > 0).all() and buckets["share"].sum() == pytest.approx(1.0)
    total = df.set_index("steps")["image_mse"]
    assert total["sum of buckets"] == pytest.approx(buckets["image_mse"].sum())
    # quantized at every step = the quantized model's own samples, measured against the FP model's
    fden, qden = load_denoiser(data / "model"), load_denoiser_from_export(data / "export")
    chosen = [int(s) for s in load_tensors(data / "samples/fp/a.safetensors")["seeds"][:seeds]]
    own = {name: sample(den, scheduler_from_protocol(proto), chosen, steps=steps, eta=float(proto["eta"]),
                        progress=False) for name, den in (("fp", fden), ("q", qden))}
    assert total["all"] == pytest.approx(float((own["q"] - own["fp"]).pow(2).mean()), rel=1e-6)


def test_a_swap_at_a_step_outside_the_schedule_is_refused_before_sampling(data):
    proto = read_json(data / "samples/fp/meta.json")
    den = load_denoiser(data / "model")
    steps = int(proto["steps"])
    with pytest.raises(ValueError, match=f"swap: step {steps} is not allowed: expected step indices in 0..{steps - 1}"):
        sample(den, scheduler_from_protocol(proto), [0], steps=steps, progress=False, swap=(den, [0, steps]))


def test_per_step_error_is_the_quantized_prediction_s_relative_error_on_the_fp_trajectories(data):
    df = diagnose.per_step_error(data, {"q": data}, seeds=2)
    shard = load_tensors(sorted((data / "trajectories").glob("shard-*.safetensors"))[0])
    steps = shard["x"].shape[1]
    assert list(df["step"]) == list(range(steps)) and df["t"].tolist() == shard["t"].tolist()
    i = steps // 2
    x, t = shard["x"][:2, i], shard["t"][i].expand(2)
    fp = load_denoiser(data / "model").predict(x, t)
    q = load_denoiser_from_export(data / "export").predict(x, t)
    assert df["q"][i] == pytest.approx(float((q - fp).pow(2).mean() / fp.pow(2).mean()), rel=1e-6)
    assert (df["q"] > 0).all()


def test_the_report_is_named_after_both_rows_even_with_a_dot_in_a_name(data, tmp_path):
    out = tmp_path / "out"
    assert diagnose.main(["--first", str(data), "--second", str(data), "--names", "w4-4.5-bits,w8",
                          "--out", str(out), "--reach-seeds", "2", "--reach-bucket", "100"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["diagnose-w4-4.5-bits-vs-w8.md", "diagnose-w4-4.5-bits-vs-w8.png"]
    # the reproduced project calibrates with the minmax preset: no unit to compare, said in a line
    md = (out / "diagnose-w4-4.5-bits-vs-w8.md").read_text()
    assert "(a row without block reconstruction: nothing to compare)" in md


@pytest.mark.parametrize("n", [3, 10, 14])
def test_unit_ratios_list_each_unit_once_and_only_the_extremes_of_many(n):
    units = pd.DataFrame([{"replicate": r, "unit": f"u{k}", "row": row,
                           "mse_after": (k + 1.0) * (2 if row == "a" else 1) * (1 + r)}
                          for r in (0, 1) for k in range(n) for row in ("a", "b")])
    units.loc[(units["unit"] == "u1") & (units["row"] == "a"), "mse_after"] *= 3  # u1: a errs 6x b
    ratios = diagnose.unit_ratios(units, "a", "b")
    assert len(ratios) == min(n, 10) and ratios.index.is_unique
    assert ratios.index[-1] == "u1" and ratios["u1"] == pytest.approx(6.0)
    assert diagnose.unit_ratios(units[units["row"] == "a"], "a", "b") is None
