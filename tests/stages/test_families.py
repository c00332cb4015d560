"""The three model families end to end: generate -> select -> calibrate -> export -> evaluate in a temp dir.

Tiny random-weight pipelines (tests/support/models.py): a CIFAR-10-DDPM-architecture pixel UNet with
attention, an LDM (VQModel + UNet2DModel) and a Stable-Diffusion-style text pipeline (AutoencoderKL +
UNet2DConditionModel + CLIPTextModel + CLIPTokenizer from a local vocabulary). Checked: exactly the
UNet's layers are quantized (never the autoencoder or the text encoder), latent models are calibrated in
latent space, and text conditioning (prompt rows, both guidance branches) is recorded and used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from support.projects import CODE_BITS_8, run_stage_mains, small_params, write_params
from pqd.diffusion.quantized import load_quantized_unet
from pqd.formats.calibset import CalibSet
from pqd.core.modules import quant_layers
from pqd.stages import generate, model
from support.models import PROMPTS, build_latent_ldm, build_pixel_cifar, build_text_sd

pytestmark = pytest.mark.slow  # all six stages on three model families: make test-fast leaves them out

BUILDERS = {"pixel": build_pixel_cifar, "latent": build_latent_ldm, "text": build_text_sd}


def run_family(d: Path, family: str, features: Path, **extra) -> Path:
    source = BUILDERS[family](d / "source")
    sections = {"model": {"source": str(source)}, "quant": {"weight_bits": 4},
                "evaluate": {"features": f"torchscript:{features}", "reference": str(d / "data/samples/fp/b")},
                "generate": {"steps": 5, "calib_seeds": 4, "eval_samples": 6, "batch_size": 6, "shard_size": 2},
                "select": {"num_samples": 8, "shard_size": 5},
                "calibrate": {"recon_iters": 4, "batch_size": 8}, **extra}
    return run_stage_mains(write_params(d, small_params(**sections)), d / "data")


def unet_layers(folder: Path) -> set[str]:
    from pqd.diffusion.adapter import load_denoiser

    unet = load_denoiser(folder).unet
    return {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def metrics(data: Path, stage: str) -> dict:
    return json.loads((data / f"metrics/{stage}.json").read_text())


def check_common(data: Path, image_shape: tuple[int, int, int]) -> None:
    """Every UNet Conv2d/Linear quantized, nothing else; evaluate produced finite metrics on real images."""
    qunet = load_quantized_unet(data / "export")
    assert set(quant_layers(qunet)) == unet_layers(data / "model")
    qmap = json.loads((data / "export/qmap.json").read_text())
    assert qmap["layers"]["conv_in"]["weight_bits"] == CODE_BITS_8  # edge layers stay 8-bit
    assert any(v["weight_storage"] == "int4_packed" for v in qmap["layers"].values())
    ev = metrics(data, "evaluate")
    assert all(torch.isfinite(torch.tensor(ev[k])) for k in ("fid_quant_vs_fp", "noise_floor", "psnr_mean"))
    imgs = load_file(data / "samples/quant/quant.safetensors")["images"]
    assert tuple(imgs.shape[1:]) == image_shape


@pytest.fixture(scope="module")
def pixel(tmp_path_factory, ts_features):
    return run_family(tmp_path_factory.mktemp("pixel"), "pixel", ts_features)


@pytest.fixture(scope="module")
def latent(tmp_path_factory, ts_features):  # with quantized attention matmuls, softmax output at the default 16 bits
    return run_family(tmp_path_factory.mktemp("latent"), "latent", ts_features, quant={"weight_bits": 4, "attention": True})


@pytest.fixture(scope="module")
def text(tmp_path_factory, ts_features):
    d = tmp_path_factory.mktemp("text")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return run_family(d, "text", ts_features, quant={"weight_bits": 4, "attention": True, "softmax_bits": 8}, generate={
        "steps": 5, "calib_seeds": 4, "eval_samples": 6, "batch_size": 6, "shard_size": 2,
        "prompts": str(d / "prompts.txt"), "guidance_scale": 3.0})


def test_pixel_cifar_with_attention(pixel):
    check_common(pixel, (3, 16, 16))
    assert metrics(pixel, "evaluate")["protocol"]["backend"].startswith("onnxruntime")  # the deployed graphs
    layers = set(quant_layers(load_quantized_unet(pixel / "export")))
    assert {"down_blocks.1.attentions.0.to_q", "down_blocks.1.attentions.0.to_k", "up_blocks.2.attentions.0.to_out.0",
            "mid_block.attentions.0.to_v"} <= layers
    rec = pd.read_csv(pixel / "qstate/reconstruction.csv")
    assert "down_blocks.1.attentions.0" in set(rec["unit"])  # attention blocks are reconstruction units
    assert metrics(pixel, "generate")["family"] == "pixel"


def test_latent_is_calibrated_in_latent_space(latent):
    check_common(latent, (3, 16, 16))  # 8x8 latents decoded to 16x16 images by the float VQ decoder
    traj = load_file(latent / "trajectories/shard-00000.safetensors")
    assert traj["x"].shape == (2, 5, 3, 8, 8)
    x, _, cond = CalibSet(latent / "calib").load(0, 8)
    assert x.shape == (8, 3, 8, 8) and cond is None
    export_files = json.loads((latent / "export/manifest.json").read_text())["files"]
    assert any(f.startswith("vqvae/") for f in export_files)  # the decoder ships in float beside the UNet
    assert not any(k.startswith(("encoder", "decoder", "quant")) for k in
                   json.loads((latent / "export/qmap.json").read_text())["layers"])
    # quantized attention: Q·Kᵀ on two 8-bit operands, softmax·V with the softmax output on 16 bits; in the deployed
    # graph Q·Kᵀ runs as an integer kernel and softmax·V (no 16-bit integer kernel) as float arithmetic
    qmap = json.loads((latent / "export/qmap.json").read_text())["layers"]
    matmuls = {n: (v["a_bits"], v["b_bits"]) for n, v in qmap.items() if v["kind"] == "matmul"}
    assert matmuls["mid_block.attentions.0.processor.qk"] == (8, 8) and matmuls["mid_block.attentions.0.processor.pv"] == (16, 8)
    assert len(matmuls) == 2 * sum(1 for n in unet_layers(latent / "model") if n.endswith(".to_q"))
    assert metrics(latent, "calibrate")["attention_matmuls"] == len(matmuls)
    kernels = metrics(latent, "export")["onnx_kernels"]
    assert sum(kernels["float"].get(k, 0) for k in ("MatMul", "FusedMatMul")) == len(matmuls) // 2  # softmax·V only
    ev = metrics(latent, "evaluate")
    assert ev["protocol"]["family"] == "latent" and ev["protocol"]["backend"].startswith("onnxruntime")
    # the deployed graphs' latents are decoded by the float VQ decoder into images of the same size
    assert math.isfinite(ev["fid_deployed_vs_simulated"]) and ev["psnr_deployed_vs_simulated_median"] > 10


def test_text_records_conditioning_once_and_both_branches(text):
    check_common(text, (3, 16, 16))
    traj = text / "trajectories"
    meta = json.loads((traj / "meta.json").read_text())
    assert meta["conditioning"]["prompts"] == PROMPTS and meta["conditioning"]["guidance_scale"] == 3.0
    embeds = load_file(traj / "prompts.safetensors")["encoder_hidden_states"]
    assert embeds.shape == (len(PROMPTS) + 1, 12, 16)  # the empty prompt + each prompt, stored once
    idx = pd.read_parquet(traj / "index.parquet")
    assert sorted(idx.drop_duplicates("seed")["prompt"]) == [1, 1, 2, 3]  # seeds take the prompts in turn
    assert load_file(traj / "shard-00001.safetensors")["prompt"].tolist() == [3, 1]

    # the stored rows are the pipeline's own text encodings (the reference: diffusers' encode_prompt)
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(str(text / "model"))
    cond_ref, uncond_ref = pipe.encode_prompt(PROMPTS[1], "cpu", 1, True, negative_prompt="")
    assert torch.allclose(embeds[2], cond_ref[0], atol=1e-6) and torch.allclose(embeds[0], uncond_ref[0], atol=1e-6)

    calib = pd.read_parquet(text / "calib/index.parquet")
    assert len(calib) == 16 and calib["branch"].value_counts().to_dict() == {"cond": 8, "uncond": 8}
    assert (calib[calib["branch"] == "uncond"]["prompt"] == 0).all()
    assert (calib[calib["branch"] == "cond"]["prompt"] >= 1).all()
    data = CalibSet(text / "calib")
    x, t, cond = data.load(0, len(data))
    cond = cond["encoder_hidden_states"]
    assert cond.shape == (16, 12, 16) and torch.equal(cond[torch.tensor(calib["branch"].eq("uncond").to_numpy())][0], embeds[0])

    layers = set(quant_layers(load_quantized_unet(text / "export")))
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in layers  # cross-attention on the text
    qmap = json.loads((text / "export/qmap.json").read_text())["layers"]
    cross = qmap["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.pv"]  # softmax·V over the prompt tokens
    assert cross["kind"] == "matmul" and (cross["a_bits"], cross["b_bits"]) == (8, 8)  # quant.softmax_bits = 8
    export_files = json.loads((text / "export/manifest.json").read_text())["files"]
    assert any(f.startswith("text_encoder/") for f in export_files) and any(f.startswith("tokenizer/") for f in export_files)
    ev = metrics(text, "evaluate")["protocol"]
    assert ev["family"] == "text" and ev["prompts"] == 3 and ev["guidance_scale"] == 3.0
    # deployed: the ONNX graphs take the prompt's encoder hidden states, and evaluate runs them in onnxruntime
    graph = onnx.load(str(text / "export/onnx/unet.g0.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert ev["backend"].startswith("onnxruntime")
    ev = metrics(text, "evaluate")
    assert math.isfinite(ev["fid_deployed_vs_simulated"]) and ev["psnr_deployed_vs_simulated_median"] > 10


@pytest.mark.parametrize("prompts, expected", [
    (None, "params: generate.prompts = None is not allowed"),
    (b"\n  \n", "generate.prompts = '{f}': the file holds no prompt: expected one prompt per line"),
    (b"a red bus\n\xff\xfe caf\xe9\n", "generate.prompts = '{f}': not UTF-8 text (byte 10 is b'\\xff'): "
                                         "expected a UTF-8 text file with one prompt per line"),
])
def test_text_model_bad_prompts_fail_before_sampling(tmp_path, capsys, prompts, expected):
    """No prompts, an empty prompts file, a prompts file that is not UTF-8: one line, exit 2, nothing written."""
    source = build_text_sd(tmp_path / "source")
    f = tmp_path / "prompts.txt"
    if prompts is not None:
        f.write_bytes(prompts)
    gen = {"prompts": str(f)} if prompts is not None else {}
    params = write_params(tmp_path, small_params(model={"source": str(source)}, generate=gen))
    data = tmp_path / "data"
    assert model.main(["--params", str(params), "--metrics", str(data / "m.json"), "--out", str(data / "model")]) == 0
    rc = generate.main(["--params", str(params), "--metrics", str(data / "g.json"), "--model", str(data / "model"),
                        "--trajectories", str(data / "trajectories"), "--samples", str(data / "samples")])
    assert rc == 2 and not (data / "trajectories").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pqd generate: error: " + expected.format(f=f))
