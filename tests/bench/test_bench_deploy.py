"""``make bench-deploy`` at tiny sizes: the PQD graphs with and without glue and the quantize_static yardstick are
timed in one run for a UNet and for a class-conditional DiT (fed its labels), with this machine's integer codes, and
the table gives the CPU flags and PQD / quantize_static for every PQD graph at every batch."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from diffusers import DiTPipeline

from pqd.bench import deploy as bench
from pqd.bench.deploy_models import (ATTENTION, ATTENTION_SHARED, GLUE, GLUE_ATTENTION, GLUE_ATTENTION_SHARED,
                                     GLUE_NO_SPLIT, variants)
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.demo import build_demo_dit, build_demo_scheduler
from pqd.params import integer_codes, params_from_dict


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """A random one-block DiT with the demo's classes and patching, as a pipeline folder (no autoencoder)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dit") / "pipe"
    DiTPipeline(transformer=build_demo_dit(width=32, depth=1).eval(), vae=None,
                scheduler=build_demo_scheduler()).save_pretrained(folder)
    return folder


def run_bench(tmp_path, *argv: str) -> tuple[pd.DataFrame, str]:
    out = tmp_path / "out"
    assert bench.main([*argv, "--rounds", "1", "--batches", "1,2", "--calib-seeds", "2", "--threads", "1",
                       "--out", str(out)]) == 0
    return pd.read_csv(out / "deploy.csv"), (out / "deploy.md").read_text()


def test_variants_apply_where_the_network_has_sites(tiny_pipeline, tiny_dit):
    unet, dit = load_denoiser(tiny_pipeline), load_denoiser(tiny_dit)
    assert list(variants(unet)) == [GLUE, GLUE_NO_SPLIT, ATTENTION, GLUE_ATTENTION, GLUE_ATTENTION_SHARED]
    assert list(variants(unet, "split")) == [GLUE]
    assert list(variants(dit)) == [ATTENTION, ATTENTION_SHARED]  # a DiT has attention but no glue points
    assert variants(unet, "shared")[GLUE_ATTENTION_SHARED].share and variants(dit, "shared")[ATTENTION_SHARED].share


@pytest.mark.slow  # about a minute: three calibrations and exports, four timed backends
def test_unet_glue_backends_against_the_yardstick(tiny_pipeline, tmp_path):
    rows, md = run_bench(tmp_path, "--only", "demo", "--model", str(tiny_pipeline), "--variants", "split")
    assert set(rows.backend) == {"torch fp32 eager", "torch bf16 autocast", "onnxruntime fp32", bench.INT8, GLUE,
                                 bench.REFERENCE}
    codes = integer_codes(params_from_dict({}))
    assert f"quantize_static yardstick: reduce_range={codes.reduce_range}" in md
    assert "int8 dot-product flags" in md
    assert ("W8 (7-bit codes) export safetensors" in md) == codes.reduce_range
    for b in (1, 2):
        for graph in ("int8", "int8 + glue"):
            assert f"batch {b}: PQD {graph} / quantize_static = **" in md
    glue_row = next(ln for ln in md.splitlines() if ln.startswith(f"| {GLUE} |"))
    assert "QLinearAdd" in glue_row and "sites" in glue_row


@pytest.mark.slow  # about 20 s: three calibrations and exports of the DiT, timed backends
def test_dit_is_fed_its_class_labels_and_its_attention_runs_on_integer_kernels(tiny_dit, tmp_path):
    rows, md = run_bench(tmp_path, "--only", "dit", "--dit-model", str(tiny_dit))
    assert set(rows.backend) == {"torch fp32 eager", "torch bf16 autocast", "onnxruntime fp32", bench.INT8, ATTENTION,
                                 ATTENTION_SHARED, bench.REFERENCE}
    assert rows.ms_per_call.notna().all()
    assert "batch 2: PQD int8 / quantize_static = **" in md and "No glue backend" in md
    assert "batch 2: PQD int8 + attention matmuls / quantize_static = **" in md
    plain, attention = (next(ln for ln in md.splitlines() if ln.startswith(f"| {b} |")) for b in (bench.INT8, ATTENTION))
    assert "QLinearMatMul" not in plain and "QLinearMatMul" in attention and "softmax_bits 8" in attention
    assert "batch 2: PQD int8 + attention matmuls + shared grids / quantize_static = **" in md
