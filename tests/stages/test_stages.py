"""Each stage on tiny inputs in a temp dir, through its real command line (main)."""

import math
import json

import numpy as np
import pandas as pd
import scipy.linalg
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from support.projects import CODE_BITS_8, small_params, write_params
from pqd.params import params_from_dict
from pqd.formats import qstate as qcodec
from pqd.diffusion.quantized import load_quantized_net
from pqd.core.modules import quant_layers, quant_matmuls, quant_sites
from pqd.core.quantize import weight_layers
from pqd.stages import calibrate, evaluate, export, generate, model, select


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_pipeline, ts_features):
    """model -> generate -> select -> calibrate -> export -> evaluate on the tiny pipeline, W4A8."""
    d = tmp_path_factory.mktemp("run")
    params = write_params(d, small_params(
        model={"source": str(tiny_pipeline)}, quant={"weight_bits": 4}, generate={"calib_seed_base": 7_000_000},
        evaluate={"features": f"torchscript:{ts_features}", "reference": str(d / "data/samples/fp/b")}))
    m = lambda s: ["--params", str(params), "--metrics", str(d / f"data/metrics/{s}.json")]  # noqa: E731
    data = d / "data"
    assert model.main(m("model") + ["--out", str(data / "model")]) == 0
    assert generate.main(m("generate") + ["--model", str(data / "model"), "--trajectories", str(data / "trajectories"),
                                          "--samples", str(data / "samples/fp")]) == 0
    assert select.main(m("select") + ["--trajectories", str(data / "trajectories"), "--out", str(data / "calib")]) == 0
    assert calibrate.main(m("calibrate") + ["--model", str(data / "model"), "--calib", str(data / "calib"),
                                            "--out", str(data / "qstate")]) == 0
    assert export.main(m("export") + ["--model", str(data / "model"), "--qstate", str(data / "qstate"),
                                      "--out", str(data / "export")]) == 0
    assert evaluate.main(m("evaluate") + ["--model", str(data / "model"), "--export", str(data / "export"),
                                          "--fp-samples", str(data / "samples/fp"), "--out", str(data / "samples/quant"),
                                          "--grid", str(data / "metrics/grid.png")]) == 0
    return d


def metrics(d, stage):
    return json.loads((d / "data/metrics" / f"{stage}.json").read_text())


def test_model_stage_records_weight_hashes(pipeline_run):
    info = json.loads((pipeline_run / "data/model/model.json").read_text())
    assert any(k.startswith("unet/") and k.endswith(".safetensors") for k in info["sha256"])
    assert all(len(v) == 64 for v in info["sha256"].values())
    assert (pipeline_run / "data/model/model_index.json").is_file()


def test_generate_records_exact_unet_inputs(pipeline_run, tiny_pipeline):
    from diffusers import DDIMScheduler

    traj = pipeline_run / "data/trajectories"
    idx = pd.read_parquet(traj / "index.parquet")
    assert len(idx) == 6 * 6 and sorted(idx["shard"].unique()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    shard = load_file(traj / "shard-00000.safetensors")
    assert shard["x"].shape == (4, 6, 1, 8, 8)
    sched = DDIMScheduler.from_pretrained(tiny_pipeline / "scheduler")
    sched.set_timesteps(6)
    assert shard["t"].tolist() == [float(t) for t in sched.timesteps]  # the raw timesteps, not step indices
    # the calibration seeds start at generate.calib_seed_base; step 0 input is the seed's initial noise
    from pqd.diffusion.sampling import initial_noise
    assert shard["seeds"].tolist() == [7_000_000 + i for i in range(4)] and sorted(idx["seed"].unique())[-1] == 7_000_005
    assert json.loads((traj / "meta.json").read_text())["seed_base"] == 7_000_000
    assert torch.equal(shard["x"][:, 0], initial_noise(shard["seeds"].tolist(), (1, 8, 8)))
    fp = pipeline_run / "data/samples/fp"
    assert len(list((fp / "a").glob("*.png"))) == 12 and len(list((fp / "b").glob("*.png"))) == 12


def test_select_writes_index_with_reasons(pipeline_run):
    from pqd.formats.calibset import CalibSet

    calib = pipeline_run / "data/calib"
    idx = pd.read_parquet(calib / "index.parquet")
    data = CalibSet(calib)
    x, t, cond = data.load(0, len(data))
    assert len(idx) == 16 == len(x) == len(t) and cond is None
    assert idx["why"].str.startswith("k-center").all()
    assert not idx.duplicated(["seed", "step"]).any()
    assert torch.equal(t, torch.tensor(idx["t"].tolist(), dtype=torch.float32))
    assert (t[1:] <= t[:-1]).all()  # ordered by decreasing timestep: time groups are contiguous runs
    # each input is the recorded trajectory input of its seed and step
    traj = load_file(pipeline_run / "data/trajectories" / idx["shard"][3])
    assert torch.equal(x[3], traj["x"][idx["row"][3], idx["step"][3]])


def test_calibrate_and_export_are_4bit_packed(pipeline_run):
    exp = pipeline_run / "data/export"
    qmap = json.loads((exp / "qmap.json").read_text())
    assert qmap["format_version"] == 1
    layers = qmap["layers"]
    assert layers["conv_in"]["weight_bits"] == CODE_BITS_8  # edge layers stay 8-bit
    assert layers["mid_block.resnets.0.conv1"]["weight_storage"] == "int4_packed"
    t = load_file(exp / "unet/quantized.safetensors")
    assert t["mid_block.resnets.0.conv1.qweight"].dtype == torch.uint8
    assert t["conv_in.qweight"].dtype == torch.int8
    packed = t["mid_block.resnets.0.conv1.qweight"]
    assert packed.numel() == (math.prod(layers["mid_block.resnets.0.conv1"]["shape"]) + 1) // 2  # two codes per byte
    # whole-file ratio of this 8/16-channel UNet: per-layer scales, the grids of the glue sites and attention
    # operands (per time group, on by default) and the safetensors header weigh a lot here
    assert metrics(pipeline_run, "export")["size_ratio"] > 2.0
    # the deployable graphs hold the 4-bit codes as INT4 too, and every runtime still runs them on int8 kernels
    ex = metrics(pipeline_run, "export")
    assert ex["onnx_int4_initializers"] > 0 and ex["onnx_size_ratio"] > 0  # (graph files dominate at this size)
    for runtime, audit in ex["onnx_kernels"].items():
        assert not audit["fallbacks"] and audit["integer_layers"] > 0, runtime


def test_calibrate_with_shared_grids_reconstructs_one_grid_per_tensor(pipeline_run, tiny_pipeline):
    """quant.share_grids: the calibrate stage records the groups, reconstruction learns each shared grid once, and
    the written state holds one grid per group."""
    params = params_from_dict(small_params(model={"source": str(tiny_pipeline)}, quant={
        "share_grids": True, "attention": True, "softmax_bits": 8, "glue": ["concat", "residual"]},
        calibrate={"split_shortcut": False}))
    out = pipeline_run / "data/qstate-shared"
    m = calibrate.run(params, pipeline_run / "data/model", pipeline_run / "data/calib", out)
    assert m.reconstructed_units > 0 and m.units_improved > 0
    state, _, _, trailer = qcodec.read(out, qcodec.STATE_TENSORS)
    groups = trailer["shared_grids"]
    fields = {"in": ("act_scale", "act_zero_point"), "out": ("out_scale", "out_zero_point"),
              "a": ("a_scale", "a_zero_point"), "b": ("b_scale", "b_zero_point")}
    roles = {r for g in groups for _, r in g[1:]}
    assert {"in", "a", "b"} <= roles  # query/key/value inputs, projections feeding the attention matmuls
    for (lead, side), *members in groups:
        lp = state[lead]
        want = (lp.scale, lp.zero_point) if lp.kind == "site" else tuple(getattr(lp, f) for f in fields[side])
        assert not torch.equal(want[0][0], want[0][1])  # still one grid per time group
        for name, role in members:
            got = tuple(getattr(state[name], f) for f in fields[role])
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_export_reload_is_bit_identical(pipeline_run):
    state, _, _, _ = qcodec.read(pipeline_run / "data/qstate", qcodec.STATE_TENSORS)
    unet = load_quantized_net(pipeline_run / "data/export")
    ql, weights = quant_layers(unet), weight_layers(state)
    assert set(ql) == set(weights)
    # the defaults' glue sites and attention matmuls come back as quantized modules too
    others = set(state) - set(weights)
    assert others and others == set(quant_sites(unet)) | set(quant_matmuls(unet))
    for name, lp in weights.items():
        assert torch.equal(ql[name].weight_int, lp.weight_int)
        assert torch.equal(ql[name].dequantized_weight(), lp.weight_int.float() * lp.weight_scale.reshape(-1, *[1] * (lp.weight_int.ndim - 1)))


def test_every_conv_and_linear_quantized(pipeline_run, tiny_pipeline):
    from diffusers import UNet2DModel

    fp = UNet2DModel.from_pretrained(tiny_pipeline / "unet")
    names = {n for n, m in fp.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(quant_layers(load_quantized_net(pipeline_run / "data/export"))) == names


def _frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets [N, D], computed here from the definition (scipy's sqrtm), not by the product."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_evaluate_fids_equal_a_plain_computation_from_the_images(pipeline_run, ts_features):
    """The FIDs evaluate reports equal FIDs computed here from its PNGs with the same TorchScript network."""
    net = torch.jit.load(str(ts_features))

    def features(folder):
        imgs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(folder.glob("*.png"))]
        with torch.no_grad():
            return net(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)).double().numpy()

    ev = metrics(pipeline_run, "evaluate")
    fp_a, fp_b = features(pipeline_run / "data/samples/fp/a"), features(pipeline_run / "data/samples/fp/b")
    quant = features(pipeline_run / "data/samples/quant/images")
    assert ev["fid_quant_vs_fp"] == pytest.approx(_frechet_reference(quant, fp_a), rel=1e-4, abs=1e-9)
    assert ev["noise_floor"] == pytest.approx(_frechet_reference(fp_b, fp_a), rel=1e-4, abs=1e-9)
    assert ev["noise_floor"] > 0  # two disjoint sets of FP samples


def test_evaluate_metrics_and_protocol(pipeline_run):
    ev = metrics(pipeline_run, "evaluate")
    assert ev["protocol"]["num_samples"] == 12 and ev["protocol"]["features"].startswith("torchscript")
    assert (pipeline_run / "data/metrics/grid.png").is_file()
    per = pd.read_csv(pipeline_run / "data/samples/quant/per_image.csv")
    q = load_file(pipeline_run / "data/samples/quant/quant.safetensors")["images"]
    fp = load_file(pipeline_run / "data/samples/fp/a.safetensors")["images"]
    mse = ((q - fp) ** 2).flatten(1).mean(1).numpy()  # the same seeds, image by image
    assert len(per) == 12 and np.allclose(per["psnr"], 10 * np.log10(1 / mse), atol=1e-3)
    assert ev["psnr_mean"] == pytest.approx(per["psnr"].mean(), rel=1e-6)


def test_evaluate_records_intervals_and_the_per_image_floor(pipeline_run):
    """Bootstrap intervals of the paired statistics (200 resamples here), and the mean PSNR between FP images of
    different seeds computed by hand from the two FP sets."""
    ev = metrics(pipeline_run, "evaluate")
    assert "200 bootstrap resamples of the 12 evaluation seeds" in ev["protocol"]["intervals"]
    for k in ("fid_quant_vs_ref", "fid_fp_vs_ref", "delta_fid", "fid_quant_vs_fp", "psnr_mean"):
        lo, hi = ev[f"{k}_ci"]["lo"], ev[f"{k}_ci"]["hi"]
        assert math.isfinite(lo) and lo <= hi, k
    assert ev["psnr_mean_ci"]["lo"] <= ev["psnr_mean"] <= ev["psnr_mean_ci"]["hi"]
    assert ev["delta_fid_ci"]["lo"] <= ev["delta_fid"] <= ev["delta_fid_ci"]["hi"]
    fp = pipeline_run / "data/samples/fp"
    a, b = load_file(fp / "a.safetensors")["images"], load_file(fp / "b.safetensors")["images"]
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))
    assert ev["psnr_other_seed_mean"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)


def test_evaluate_on_openvino_judges_the_graphs_openvino_runs(pipeline_run):
    """evaluate.backend: openvino scores the images of the same W4 graphs run by OpenVINO, and the release gate's
    deployment and kernel checks judge that runtime."""
    from pqd.formats.metrics import EvaluateMetrics, ExportMetrics
    from pqd.ops.release import deployment_check, kernels_check

    d = pipeline_run
    data = yaml.safe_load((d / "params.yaml").read_text())
    data["evaluate"]["backend"] = "openvino"
    (d / "ov").mkdir()
    params = write_params(d / "ov", data)
    out = d / "ov-metrics.json"
    assert evaluate.main(["--params", str(params), "--metrics", str(out), "--model", str(d / "data/model"),
                          "--export", str(d / "data/export"), "--fp-samples", str(d / "data/samples/fp"),
                          "--out", str(d / "data/samples/quant-ov"), "--grid", str(d / "ov-grid.png")]) == 0
    ev = EvaluateMetrics.read(out)
    assert ev.protocol.backend == "openvino (deployed ONNX, integer kernels)"
    assert ev.fid_deployed_vs_simulated is not None and ev.psnr_deployed_vs_simulated_median > 20
    check = deployment_check(ev)
    assert check.passed, check.detail
    kernels = kernels_check(ExportMetrics.read(d / "data/metrics/export.json"), "openvino")
    assert kernels.passed and kernels.detail.startswith("openvino: "), kernels.detail


def test_mixed_precision_under_a_budget_moves_the_most_sensitive_layers_to_8_bits(pipeline_run, tiny_pipeline):
    """quant.weight_bits_budget with per-group scales: calibrate measures every 4-bit layer's sensitivity, moves the
    layers it chose to 8 bits, stays within the budget (scales included), and qstate, export manifest and metrics
    record the choice; a budget below the all-4-bit cost is refused before any work."""
    d = pipeline_run / "data"
    base = small_params(model={"source": str(tiny_pipeline)}, quant={"weight_bits": 4, "weight_group_size": 4},
                        calibrate={"reconstruct": False, "sensitivity_samples": 8})
    floor = calibrate.run(params_from_dict(base), d / "model", d / "calib", d / "qstate-g4").weight_bits_mean
    budget = round(floor + 0.5, 2)
    params = params_from_dict({**base, "quant": {**base["quant"], "weight_bits_budget": budget}})
    m = calibrate.run(params, d / "model", d / "calib", d / "qstate-mixed")
    state, _, _, trailer = qcodec.read(d / "qstate-mixed", qcodec.STATE_TENSORS)
    mixed = trailer["mixed_precision"]
    assert floor < m.weight_bits_mean <= budget and m.mixed_high_layers == len(mixed["high_layers"]) > 0
    assert mixed["mean_bits"] == pytest.approx(m.weight_bits_mean, abs=1e-3)
    for name in mixed["high_layers"]:
        assert state[name].weight_bits == CODE_BITS_8 and state[name].weight_scale.dim() == 1  # per channel at 8 bits
    low = [n for n in mixed["sensitivity"] if n not in mixed["high_layers"]]
    assert low and all(state[n].weight_bits == 4 and state[n].weight_scale.dim() == 2 for n in low)
    # the greedy choice favours sensitive layers: the promoted ones are, on average, the more sensitive
    sens = mixed["sensitivity"]
    assert np.mean([sens[n] for n in mixed["high_layers"]]) > np.mean([sens[n] for n in low])
    ex = export.run(params, d / "model", d / "qstate-mixed", d / "export-mixed")
    manifest = json.loads((d / "export-mixed/manifest.json").read_text())
    assert manifest["weights"]["mixed_precision"]["high_layers"] == mixed["high_layers"]
    assert ex.weight_bits_mean == manifest["weights"]["bits_mean"] == pytest.approx(m.weight_bits_mean, abs=1e-3)
    too_low = params_from_dict({**base, "quant": {**base["quant"], "weight_bits_budget": round(floor - 0.3, 2)}})
    with pytest.raises(ValueError, match="quant.weight_bits_budget = .* is not allowed for this model"):
        calibrate.run(too_low, d / "model", d / "calib", d / "qstate-too-low")
    assert not (d / "qstate-too-low").exists()


def test_rotated_attention_calibrates_exports_and_deploys_what_it_calibrated(pipeline_run, tiny_pipeline):
    """quant.rotate: hadamard folds a rotation into every attention's value and output projections before calibration;
    the export folds the same into the float tensors it ships (the value projection's bias), so the exported model
    is as close to the original FP model as an unrotated export is, and qstate and metrics record what was rotated."""
    from pqd.core.rotate import rotate_attention
    from pqd.diffusion.adapter import load_denoiser
    from pqd.diffusion.quantized import load_denoiser_from_export

    d = pipeline_run / "data"
    errs = {}
    for kind in ("none", "hadamard"):
        # (no ONNX graphs: they are traced from the export folder the loader rebuilds, rotated or not)
        params = params_from_dict(small_params(model={"source": str(tiny_pipeline)}, quant={"rotate": kind},
                                               calibrate={"reconstruct": False}, export={"onnx": False},
                                               evaluate={"backend": "torch"}))
        m = calibrate.run(params, d / "model", d / "calib", d / f"qstate-{kind}")
        export.run(params, d / "model", d / f"qstate-{kind}", d / f"export-{kind}")
        trailer = qcodec.read_qmap(d / f"qstate-{kind}")["rotation"]
        assert trailer["kind"] == kind and m.rotated_attention == (None if kind == "none" else trailer["rotated"])
        fp, q = load_denoiser(d / "model"), load_denoiser_from_export(d / f"export-{kind}")
        torch.manual_seed(0)
        x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 100, (8,))
        with torch.no_grad():
            ref = fp.predict(x, t, None)
            errs[kind] = float((q.predict(x, t, None) - ref).norm() / ref.norm())
        if kind == "hadamard":
            assert trailer["rotated"] == 4 and not trailer["skipped"]
            rotate_attention(fp.net, kind)
            name = next(n for n, p in fp.net.named_parameters() if n.endswith("to_v.bias"))
            assert torch.allclose(dict(q.net.named_parameters())[name].float(), dict(fp.net.named_parameters())[name])
    print(f"relative output error vs FP: {errs}")
    assert errs["hadamard"] < 1.5 * errs["none"] + 1e-3
