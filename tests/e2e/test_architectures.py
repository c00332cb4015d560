"""Every architecture end to end, one matrix: the six stages, each through its command-line ``main`` as dvc.yaml
calls it, in this process, deployed in onnxruntime, on

- pixel: the google/ddpm-cifar10-32 UNet architecture with attention, at tiny widths;
- latent: an LDM (VQModel + UNet2DModel), calibrated in latent space;
- text: a Stable-Diffusion-style pipeline (AutoencoderKL + UNet2DConditionModel + CLIPTextModel + CLIPTokenizer);
- pixart, sd3: PixArt-alpha- and SD3-shaped text-to-image transformers;
- dit: the DiT demo (class-conditional, pixel space, briefly trained by the model stage);
- user: a user's model, not ours (tests/support/models.py: build_second_model), with the default method, bits,
  export and evaluation, in a committed DVC project: the matrix's one DVC run, judged by the release gate.

The tiny pipelines are random-weight (tests/support/models.py). Checked: exactly the denoiser's layers are quantized
(never the autoencoder or the text encoder), the edge and modulation layers on their own bits, text conditioning
(prompt rows, both guidance branches) recorded and used, every conditioning input a graph input, the deployed graphs
evaluated; for the user's model, the deployed artifact matches the simulation it was calibrated as.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pqd.core.modules import quant_layers
from pqd.formats import qstate as qcodec
from pqd.formats.calibset import CalibSet
from pqd.diffusion.quantized import load_quantized_net
from pqd.formats.metrics import STAGES, CalibrateMetrics, EvaluateMetrics, ExportMetrics, GenerateMetrics
from pqd.ops import release
from pqd.stages import generate, model
from support.models import (PROMPTS, build_latent_ldm, build_pixel_cifar, build_second_model, build_text_pixart,
                            build_text_sd, build_text_sd3, write_reference_images)
from support.projects import (BIN, CODE_BITS_8, init_project, run_stage_mains, run_stages_in_process, sh,
                              small_params, write_params)

pytestmark = pytest.mark.slow  # all six stages on seven architectures: make test-fast leaves them out

# the matrix's sample counts: a few trajectories, samples and reconstruction steps
COUNTS = {"generate": {"steps": 5, "calib_seeds": 4, "eval_samples": 6, "batch_size": 6, "shard_size": 2},
          "select": {"num_samples": 8, "shard_size": 5}, "calibrate": {"recon_iters": 4, "batch_size": 8}}
# the user's model is judged by its own numbers (FID and PSNR over the evaluation seeds): more samples, and the
# default counts otherwise smaller only to fit the test budget
USER_COUNTS = {"generate": {"steps": 20, "calib_seeds": 16, "eval_samples": 96, "batch_size": 96, "shard_size": 8},
               "select": {"num_samples": 128}, "calibrate": {"recon_iters": 20}, "evaluate": {"batch_size": 96}}


@dataclass(frozen=True)
class Arch:
    build: Callable[[Path], Path] | None  # the model source built in a folder; None: ``sections`` names it
    sections: dict = field(default_factory=dict)  # params over COUNTS and small_params
    prompts: bool = False  # a prompts file (PROMPTS) and guidance 3.0


ARCHS = {
    "pixel": Arch(build_pixel_cifar, {"quant": {"weight_bits": 4}}),
    # with quantized attention matmuls, softmax output on 16 bits (the path long sequences keep; the default is 8)
    "latent": Arch(build_latent_ldm, {"quant": {"weight_bits": 4, "attention": True, "softmax_bits": 16}}),
    "text": Arch(build_text_sd, {"quant": {"weight_bits": 4, "attention": True, "softmax_bits": 8}}, prompts=True),
    # W4A8, balanced linears, quantized attention (softmax on 8 bits)
    "pixart": Arch(build_text_pixart, {"quant": {"weight_bits": 4, "smooth": True, "attention": True,
                                                 "softmax_bits": 8}}, prompts=True),
    # flow matching: the pipeline's own Euler scheduler; joint attention quantized
    "sd3": Arch(build_text_sd3, {"generate": {"scheduler": "keep"},
                                 "quant": {"weight_bits": 4, "attention": True, "softmax_bits": 8}}, prompts=True),
    # the DiT demo, briefly trained by the model stage; guidance from the architecture (1.5)
    "dit": Arch(None, {"model": {"source": "demo:digits-dit", "train_steps": 30, "feature_epochs": 1, "batch_size": 32,
                                 "dit_width": 64, "dit_depth": 2},
                       "generate": {"eval_samples": 24, "batch_size": 24}, "quant": {"weight_bits": 4}}),
}


def merged(*layers: dict) -> dict:
    """Params sections, later layers' keys over earlier ones'."""
    out: dict = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = {**out.get(k, {}), **v}
    return out


def run_arch(d: Path, arch: Arch, features: Path) -> Path:
    """The six stages of ``arch`` in ``d`` (no DVC); its data/."""
    own = {}
    if arch.build is not None:  # a random-weight pipeline, measured with the TorchScript features (a demo: its own)
        own = {"model": {"source": str(arch.build(d / "source"))},
               "evaluate": {"features": f"torchscript:{features}", "reference": str(d / "data/samples/fp/b")}}
    if arch.prompts:
        (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
        own["generate"] = {"prompts": str(d / "prompts.txt"), "guidance_scale": 3.0}
    return run_stage_mains(write_params(d, small_params(**merged(COUNTS, own, arch.sections))), d / "data")


def metrics(data: Path, stage: str) -> dict:
    return json.loads((data / f"metrics/{stage}.json").read_text())


def qmap(data: Path) -> dict:
    return json.loads((data / "export/qmap.json").read_text())["layers"]


def graph_inputs(data: Path) -> list[str]:
    return [i.name for i in onnx.load(str(data / "export/onnx/unet.g0.onnx"), load_external_data=False).graph.input]


def unet_layers(folder: Path) -> set[str]:
    from pqd.diffusion.adapter import load_denoiser

    unet = load_denoiser(folder).net
    return {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def check_unet(data: Path, image_shape: tuple[int, int, int]) -> None:
    """Every UNet Conv2d/Linear quantized, nothing else; evaluate produced finite metrics on real images."""
    qnet = load_quantized_net(data / "export")
    assert set(quant_layers(qnet)) == unet_layers(data / "model")
    assert qmap(data)["conv_in"]["weight_bits"] == CODE_BITS_8  # edge layers stay 8-bit
    assert any(v["weight_storage"] == "int4_packed" for v in qmap(data).values())
    ev = metrics(data, "evaluate")
    assert all(torch.isfinite(torch.tensor(ev[k])) for k in ("fid_quant_vs_fp", "noise_floor", "psnr_mean"))
    imgs = load_file(data / "samples/quant/quant.safetensors")["images"]
    assert tuple(imgs.shape[1:]) == image_shape


def check_transformer(data: Path, arch: str, edge: list[str], modulation: list[str]) -> None:
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
    assert ex.onnx_graphs == 2 and sum(ex.onnx_kernels["onnxruntime"]["int8"].values()) > 0
    ev = EvaluateMetrics.read(data / "metrics/evaluate.json")
    assert ev.protocol.architecture == arch and ev.protocol.backend.startswith("onnxruntime")
    assert math.isfinite(ev.fid_deployed_vs_simulated) and ev.psnr_deployed_vs_simulated_median > 25


def check_pixel(data: Path) -> None:
    check_unet(data, (3, 16, 16))
    assert metrics(data, "evaluate")["protocol"]["backend"].startswith("onnxruntime")  # the deployed graphs
    layers = set(quant_layers(load_quantized_net(data / "export")))
    assert {"down_blocks.1.attentions.0.to_q", "down_blocks.1.attentions.0.to_k", "up_blocks.2.attentions.0.to_out.0",
            "mid_block.attentions.0.to_v"} <= layers
    rec = pd.read_csv(data / "qstate/reconstruction.csv")
    assert "down_blocks.1.attentions.0" in set(rec["unit"])  # attention blocks are reconstruction units
    assert metrics(data, "generate")["family"] == "pixel"


def check_latent(data: Path) -> None:
    """Calibrated in latent space."""
    check_unet(data, (3, 16, 16))  # 8x8 latents decoded to 16x16 images by the float VQ decoder
    traj = load_file(data / "trajectories/shard-00000.safetensors")
    assert traj["x"].shape == (2, 5, 3, 8, 8)
    x, _, cond = CalibSet(data / "calib").load(0, 8)
    assert x.shape == (8, 3, 8, 8) and cond is None
    export_files = json.loads((data / "export/manifest.json").read_text())["files"]
    assert any(f.startswith("vqvae/") for f in export_files)  # the decoder ships in float beside the UNet
    assert not any(k.startswith(("encoder", "decoder", "quant")) for k in qmap(data))
    # quantized attention: Q·Kᵀ on two 8-bit operands, softmax·V with the softmax output on 16 bits; in the deployed
    # graph Q·Kᵀ runs as an integer kernel and softmax·V (no 16-bit integer kernel) as float arithmetic
    matmuls = {n: (v["a_bits"], v["b_bits"]) for n, v in qmap(data).items() if v["kind"] == "matmul"}
    assert matmuls["mid_block.attentions.0.processor.qk"] == (8, 8) and matmuls["mid_block.attentions.0.processor.pv"] == (16, 8)
    assert len(matmuls) == 2 * sum(1 for n in unet_layers(data / "model") if n.endswith(".to_q"))
    assert metrics(data, "calibrate")["attention_matmuls"] == len(matmuls)
    kernels = metrics(data, "export")["onnx_kernels"]["onnxruntime"]
    assert sum(kernels["float"].get(k, 0) for k in ("MatMul", "FusedMatMul")) == len(matmuls) // 2  # softmax·V only
    ev = metrics(data, "evaluate")
    assert ev["protocol"]["family"] == "latent" and ev["protocol"]["backend"].startswith("onnxruntime")
    # the deployed graphs' latents are decoded by the float VQ decoder into images of the same size
    assert math.isfinite(ev["fid_deployed_vs_simulated"]) and ev["psnr_deployed_vs_simulated_median"] > 10


def check_text(data: Path) -> None:
    """Conditioning recorded once, both guidance branches calibrated."""
    check_unet(data, (3, 16, 16))
    traj = data / "trajectories"
    meta = json.loads((traj / "meta.json").read_text())
    assert meta["conditioning"]["prompts"] == PROMPTS and meta["conditioning"]["guidance_scale"] == 3.0
    embeds = load_file(traj / "prompts.safetensors")["encoder_hidden_states"]
    assert embeds.shape == (len(PROMPTS) + 1, 12, 16)  # the empty prompt + each prompt, stored once
    idx = pd.read_parquet(traj / "index.parquet")
    assert sorted(idx.drop_duplicates("seed")["prompt"]) == [1, 1, 2, 3]  # seeds take the prompts in turn
    assert load_file(traj / "shard-00001.safetensors")["prompt"].tolist() == [3, 1]

    # the stored rows are the pipeline's own text encodings (the reference: diffusers' encode_prompt)
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(str(data / "model"))
    cond_ref, uncond_ref = pipe.encode_prompt(PROMPTS[1], "cpu", 1, True, negative_prompt="")
    assert torch.allclose(embeds[2], cond_ref[0], atol=1e-6) and torch.allclose(embeds[0], uncond_ref[0], atol=1e-6)

    calib = pd.read_parquet(data / "calib/index.parquet")
    assert len(calib) == 16 and calib["branch"].value_counts().to_dict() == {"cond": 8, "uncond": 8}
    assert (calib[calib["branch"] == "uncond"]["prompt"] == 0).all()
    assert (calib[calib["branch"] == "cond"]["prompt"] >= 1).all()
    cset = CalibSet(data / "calib")
    x, t, cond = cset.load(0, len(cset))
    cond = cond["encoder_hidden_states"]
    assert cond.shape == (16, 12, 16) and torch.equal(cond[torch.tensor(calib["branch"].eq("uncond").to_numpy())][0], embeds[0])

    layers = set(quant_layers(load_quantized_net(data / "export")))
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in layers  # cross-attention on the text
    cross = qmap(data)["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.pv"]  # softmax·V over the prompt
    assert cross["kind"] == "matmul" and (cross["a_bits"], cross["b_bits"]) == (8, 8)  # quant.softmax_bits = 8
    export_files = json.loads((data / "export/manifest.json").read_text())["files"]
    assert any(f.startswith("text_encoder/") for f in export_files) and any(f.startswith("tokenizer/") for f in export_files)
    ev = metrics(data, "evaluate")["protocol"]
    assert ev["family"] == "text" and ev["prompts"] == 3 and ev["guidance_scale"] == 3.0
    assert "within each of the 3 conditions" in ev["intervals"]  # the bootstrap's strata: seed i's prompt i mod 3
    # deployed: the ONNX graphs take the prompt's encoder hidden states, and evaluate runs them in onnxruntime
    assert graph_inputs(data) == ["sample", "timestep", "encoder_hidden_states"]
    assert ev["backend"].startswith("onnxruntime")
    ev = metrics(data, "evaluate")
    assert math.isfinite(ev["fid_deployed_vs_simulated"]) and ev["psnr_deployed_vs_simulated_median"] > 10


def check_pixart(data: Path) -> None:
    """Balanced linears."""
    check_transformer(data, "pixart", ["pos_embed.proj", "proj_out", "caption_projection.linear_1"], ["adaln_single.linear"])
    assert graph_inputs(data) == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    cal = CalibrateMetrics.read(data / "metrics/calibrate.json")
    balanced = sorted(n for n, v in qmap(data).items() if v.get("act_smooth"))
    assert cal.smoothed_layers == len(balanced) == 20  # 2 blocks x (4 self- + 4 cross-attention + 2 feed-forward)
    assert "transformer_blocks.0.attn2.to_k" in balanced and "adaln_single.linear" not in balanced


def check_sd3(data: Path) -> None:
    """Joint attention."""
    check_transformer(data, "sd3", ["pos_embed.proj", "proj_out", "context_embedder"],
                      ["transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear", "norm_out.linear"])
    assert graph_inputs(data) == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    matmuls = {n: (v["a_bits"], v["b_bits"]) for n, v in qmap(data).items() if v["kind"] == "matmul"}
    assert matmuls == {f"transformer_blocks.{b}.attn.processor.{m}": (8, 8) for b in (0, 1) for m in ("qk", "pv")}
    meta = json.loads((data / "samples/fp/meta.json").read_text())
    assert meta["scheduler"] == "FlowMatchEulerDiscreteScheduler" and meta["architecture"] == "sd3"


def check_dit(data: Path) -> None:
    """The DiT demo, class-conditional."""
    check_transformer(data, "dit", ["pos_embed.proj", "proj_out_2", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"],
                      ["transformer_blocks.1.norm1.linear", "proj_out_1"])
    assert graph_inputs(data) == ["sample", "timestep", "class_labels"]
    gen = GenerateMetrics.read(data / "metrics/generate.json")
    assert (gen.family, gen.prompts, gen.architecture) == ("class", 10, "dit")
    meta = json.loads((data / "trajectories/meta.json").read_text())
    assert meta["conditioning"]["classes"] == 10 and meta["conditioning"]["guidance_scale"] == 1.5  # DiT's protocol
    ev = EvaluateMetrics.read(data / "metrics/evaluate.json")
    assert ev.protocol.family == "class" and ev.protocol.features.startswith("demo:digits")
    model_index = json.loads((data / "export/model_index.json").read_text())
    assert model_index["transformer"] == ["diffusers", "DiTTransformer2DModel"] and model_index["vae"] == [None, None]


CHECKS = {"pixel": check_pixel, "latent": check_latent, "text": check_text, "pixart": check_pixart, "sd3": check_sd3,
          "dit": check_dit}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_end_to_end(arch, tmp_path, ts_features):
    CHECKS[arch](run_arch(tmp_path, ARCHS[arch], ts_features))


def test_user_model_in_a_dvc_project_deploys_what_was_calibrated_and_passes_the_gate(tmp_path, ts_features):
    """A user's model, not ours: the six stages with the default method, bits, export and evaluation (PQD preset,
    W8A8, ONNX graphs, onnxruntime evaluation, quant.reduce_range auto) on a pipeline that differs from the demo in
    every way a user's model might, with a reference folder written here, in a committed DVC project. The deployed
    artifact matches the simulation it was calibrated as, judged by the model's own numbers, and the release gate's
    checks of the artifact itself pass on it."""
    source = build_second_model(tmp_path / "pipe")
    refs = write_reference_images(tmp_path / "refs")
    project = init_project(tmp_path / "project", merged(USER_COUNTS, {
        "model": {"source": str(source)}, "evaluate": {"features": f"torchscript:{ts_features}", "reference": str(refs)}}))
    sh([str(BIN / "python"), "-m", "pqd.params", "params.yaml"], project)  # every path it names is checked first
    run_stages_in_process(project)
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == set(STAGES)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "reproduced"], project)
    data = project / "data"

    ex = ExportMetrics.read(data / "metrics/export.json")
    ev = EvaluateMetrics.read(data / "metrics/evaluate.json")
    assert ex.onnx_graphs == 4 and ex.onnx_kernels["onnxruntime"]["int8"].get("QLinearConv", 0) > 0  # PQD preset: 4 time groups
    groups = qcodec.time_groups(qcodec.read_qmap(data / "export"))  # each probe lies in its own group
    assert [int(groups.group_of(c.timestep)) for c in ex.onnx_check] == [0, 1, 2, 3]
    assert ev.protocol.backend.startswith("onnxruntime") and ev.protocol.features.startswith("torchscript:")
    # the deployed graphs are indistinguishable from the simulation at this sample size ...
    assert ev.fid_deployed_vs_simulated <= ev.noise_floor
    # ... and add no more error than quantization did: deployed images at most twice as far from FP (MSE)
    assert ev.psnr_median >= ev.psnr_simulated_median - 10 * math.log10(2)
    # the quantized images are the FP images of the same seeds, closer to them than to each other
    assert ev.psnr_median > ev.psnr_deployed_vs_simulated_median - 10 * math.log10(2) > 25
    codes = json.loads((data / "export/manifest.json").read_text())["integer_codes"]
    assert codes["setting"] == "auto" and isinstance(codes["reduce_range"], bool)

    # the gate's checks of the artifact itself: hashes, lineage, committed state and the deployed graphs judged by
    # this model's own numbers (the FID-difference checks are about quality, not the artifact)
    _, report = release.check(project)
    checks = {c.name: c for c in report.checks}
    assert all(checks[n].passed for n in ("hashes", "lineage", "committed", "deployment")), report.summary()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """The text pipeline through the model stage, once for the bad-prompts cases."""
    d = tmp_path_factory.mktemp("text-model")
    params = write_params(d, small_params(model={"source": str(build_text_sd(d / "source"))}))
    assert model.main(["--params", str(params), "--metrics", str(d / "m.json"), "--out", str(d / "model")]) == 0
    return d / "model"


@pytest.mark.parametrize("prompts, expected", [
    (None, "params: generate.prompts = None is not allowed"),
    (b"\n  \n", "generate.prompts = '{f}': the file holds no prompt: expected one prompt per line"),
    (b"a red bus\n\xff\xfe caf\xe9\n", "generate.prompts = '{f}': not UTF-8 text (byte 10 is b'\\xff'): "
                                         "expected a UTF-8 text file with one prompt per line"),
])
def test_text_model_bad_prompts_fail_before_sampling(text_model, tmp_path, capsys, prompts, expected):
    """No prompts, an empty prompts file, a prompts file that is not UTF-8: one line, exit 2, nothing written."""
    f = tmp_path / "prompts.txt"
    if prompts is not None:
        f.write_bytes(prompts)
    gen = {"prompts": str(f)} if prompts is not None else {}
    params = write_params(tmp_path, small_params(model={"source": str(text_model)}, generate=gen))
    data = tmp_path / "data"
    rc = generate.main(["--params", str(params), "--metrics", str(data / "g.json"), "--model", str(text_model),
                        "--trajectories", str(data / "trajectories"), "--samples", str(data / "samples")])
    assert rc == 2 and not (data / "trajectories").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pqd generate: error: " + expected.format(f=f))
