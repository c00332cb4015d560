"""Transformer denoisers through all six stages of a real DVC project (dvc.yaml's commands, dvc.lock), deployed in
onnxruntime: the DiT demo (class-conditional, pixel space, built by the model stage), a PixArt-shaped and an
SD3-shaped text-to-image pipeline (tests/support/models.py).
Checked: both guidance branches calibrated, the transformer blocks reconstructed, the edge and modulation layers on
their own bits (modulation outputs in float), every conditioning input a graph input, the deployed graphs evaluated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import pandas as pd
import pytest
import yaml

from pqd.formats.metrics import STAGES, CalibrateMetrics, EvaluateMetrics, ExportMetrics, GenerateMetrics
from support.models import PROMPTS, build_text_pixart, build_text_sd3, build_torchscript_features
from support.projects import CODE_BITS_8, init_project, run_stages_in_process, small_params

pytestmark = pytest.mark.slow  # all six stages on three transformers: make test-fast leaves them out

COUNTS = {"generate": {"steps": 5, "calib_seeds": 4, "eval_samples": 6, "batch_size": 6, "shard_size": 2},
          "select": {"num_samples": 8, "shard_size": 5}, "calibrate": {"recon_iters": 4, "batch_size": 8}}


def run(d: Path, sections: dict) -> Path:
    """A committed DVC project with these params, its stages run in-process and committed (dvc.lock); its data/."""
    merged = {k: {**COUNTS.get(k, {}), **v} for k, v in sections.items()} | {k: v for k, v in COUNTS.items()
                                                                              if k not in sections}
    project = init_project(d / "project", small_params(**merged))
    run_stages_in_process(project)
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == set(STAGES)
    return project / "data"


def text_run(d: Path, build, **extra) -> Path:
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    features = build_torchscript_features(d / "features.pt")
    gen = {"prompts": str(d / "prompts.txt"), "guidance_scale": 3.0, **extra.pop("generate", {})}
    return run(d, {"model": {"source": str(build(d / "source"))}, "generate": gen,
                   "evaluate": {"features": f"torchscript:{features}", "reference": "data/samples/fp/b"}, **extra})


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):  # W4A8, balanced linears, quantized attention (softmax on 8 bits)
    return text_run(tmp_path_factory.mktemp("pixart"), build_text_pixart,
                    quant={"weight_bits": 4, "smooth": True, "attention": True, "softmax_bits": 8})


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):  # flow matching: the pipeline's own Euler scheduler; joint attention quantized
    return text_run(tmp_path_factory.mktemp("sd3"), build_text_sd3, generate={"scheduler": "keep"},
                    quant={"weight_bits": 4, "attention": True, "softmax_bits": 8})


@pytest.fixture(scope="module")
def dit(tmp_path_factory):  # the DiT demo, briefly trained by the model stage; guidance from the architecture (1.5)
    return run(tmp_path_factory.mktemp("dit"), {
        "model": {"source": "demo:digits-dit", "train_steps": 30, "feature_epochs": 1, "batch_size": 32,
                  "dit_width": 64, "dit_depth": 2},
        "generate": {"eval_samples": 24, "batch_size": 24}, "quant": {"weight_bits": 4}})


def qmap(data: Path) -> dict:
    return json.loads((data / "export/qmap.json").read_text())["layers"]


def graph_inputs(data: Path) -> list[str]:
    return [i.name for i in onnx.load(str(data / "export/onnx/unet.g0.onnx"), load_external_data=False).graph.input]


def check_common(data: Path, arch: str, edge: list[str], modulation: list[str]) -> None:
    layers = qmap(data)
    for name in edge + modulation:
        assert layers[name]["weight_bits"] == CODE_BITS_8, name  # 8-bit edge and modulation weights at W4
    assert all(not layers[n]["output_quantized"] for n in modulation)  # adaLN outputs stay in float
    assert any(v.get("weight_storage") == "int4_packed" for v in layers.values())
    calib = pd.read_parquet(data / "calib/index.parquet")
    assert calib["branch"].value_counts().to_dict() == {"cond": 8, "uncond": 8}  # both guidance branches
    units = set(pd.read_csv(data / "qstate/reconstruction.csv")["unit"])
    assert {"transformer_blocks.0", "transformer_blocks.1"} <= units
    ex = ExportMetrics.read(data / "metrics/export.json")
    assert ex.onnx_graphs == 2 and sum(ex.onnx_kernels["int8"].values()) > 0
    ev = EvaluateMetrics.read(data / "metrics/evaluate.json")
    assert ev.protocol.architecture == arch and ev.protocol.backend.startswith("onnxruntime")
    assert math.isfinite(ev.fid_deployed_vs_simulated) and ev.psnr_deployed_vs_simulated_median > 25


def test_pixart_with_balanced_linears(pixart):
    check_common(pixart, "pixart", ["pos_embed.proj", "proj_out", "caption_projection.linear_1"], ["adaln_single.linear"])
    assert graph_inputs(pixart) == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    cal = CalibrateMetrics.read(pixart / "metrics/calibrate.json")
    balanced = sorted(n for n, v in qmap(pixart).items() if v.get("act_smooth"))
    assert cal.smoothed_layers == len(balanced) == 20  # 2 blocks x (4 self- + 4 cross-attention + 2 feed-forward)
    assert "transformer_blocks.0.attn2.to_k" in balanced and "adaln_single.linear" not in balanced


def test_sd3_joint_attention(sd3):
    check_common(sd3, "sd3", ["pos_embed.proj", "proj_out", "context_embedder"],
                 ["transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear", "norm_out.linear"])
    assert graph_inputs(sd3) == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    matmuls = {n: (v["a_bits"], v["b_bits"]) for n, v in qmap(sd3).items() if v["kind"] == "matmul"}
    assert matmuls == {f"transformer_blocks.{b}.attn.processor.{m}": (8, 8) for b in (0, 1) for m in ("qk", "pv")}
    meta = json.loads((sd3 / "samples/fp/meta.json").read_text())
    assert meta["scheduler"] == "FlowMatchEulerDiscreteScheduler" and meta["architecture"] == "sd3"


def test_dit_demo_class_conditional(dit):
    check_common(dit, "dit", ["pos_embed.proj", "proj_out_2", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"],
                 ["transformer_blocks.1.norm1.linear", "proj_out_1"])
    assert graph_inputs(dit) == ["sample", "timestep", "class_labels"]
    gen = GenerateMetrics.read(dit / "metrics/generate.json")
    assert (gen.family, gen.prompts, gen.architecture) == ("class", 10, "dit")
    meta = json.loads((dit / "trajectories/meta.json").read_text())
    assert meta["conditioning"]["classes"] == 10 and meta["conditioning"]["guidance_scale"] == 1.5  # DiT's protocol
    ev = EvaluateMetrics.read(dit / "metrics/evaluate.json")
    assert ev.protocol.family == "class" and ev.protocol.features.startswith("demo:digits")
    model_index = json.loads((dit / "export/model_index.json").read_text())
    assert model_index["transformer"] == ["diffusers", "DiTTransformer2DModel"] and model_index["vae"] == [None, None]
