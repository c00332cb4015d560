"""``make bench-deploy`` at tiny sizes: the PQD graphs with and without glue in onnxruntime and OpenVINO, the float
backends and both int8 yardsticks (quantize_static, NNCF) are timed in one run for a UNet and for a class-conditional
DiT (fed its labels), with this machine's integer codes, beside the CPU's ceilings; the table gives the CPU flags,
each backend's fraction of its ceiling and, per batch, the default PQD graph against the float and int8 rivals."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from diffusers import DiTPipeline

from pqd.bench import deploy as bench
from pqd.bench.deploy import in_openvino
from pqd.deploy import INT8_KERNELS
from pqd.deploy.openvino import cpu_supports_bf16
from pqd.bench.deploy_models import (ATTENTION, ATTENTION_SHARED, GLUE, GLUE_ATTENTION, GLUE_ATTENTION_SHARED,
                                     GLUE_NO_SPLIT, PREVIOUS, SYMMETRIC, Variant, variants)
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


def backends(*pqd: str) -> set[str]:
    """Every backend a run times for the PQD graphs ``pqd`` (onnxruntime names) on this CPU."""
    bf16 = {"openvino bf16", bench.OV_INT8_BF16} if cpu_supports_bf16() else set()
    return {"torch fp32 eager", "torch bf16 autocast", "onnxruntime fp32", "openvino fp32", bench.REFERENCE,
            bench.NNCF, *bf16, *pqd, *(in_openvino(b) for b in pqd)}


def check_verdicts(rows: pd.DataFrame, md: str) -> None:
    """Every backend has a rate and every integer one a fraction of its runtime's measured int8 ceiling; the table has
    the ceilings, the flags and a verdict per batch."""
    assert rows.ms_per_call.notna().all() and (rows.gmac_s > 0).all()
    int8 = rows[rows.backend.str.contains("int8")]
    assert (int8.of_ceiling > 0).all() and set(int8.ceiling) <= {"onnxruntime int8", "openvino int8"}
    assert set(rows[~rows.backend.str.contains("int8")].ceiling) <= {"torch fp32", "torch bf16"}
    assert "flags (`grep -o 'avx512_vnni" in md and "| onnxruntime int8 | 2048x2048x2048 u8 x s8 GEMM" in md
    assert "| ceiling | what | ms | GMAC/s | measured |" in md
    assert "| openvino int8 | 2048x2048x2048 u8 x s8 GEMM, QDQ MatMul (FullyConnected u8 1)" in md
    for b in (1, 2):
        assert f"- batch {b}: PQD int8, default settings, best runtime (" in md
    profiles = [ln for ln in md.splitlines() if ln.startswith(("- onnxruntime: ", "- openvino: "))]
    assert profiles and all("%" in ln for ln in profiles)
    ort_line, ov_line = (next(ln for ln in profiles if ln.startswith(f"- {r}: ")) for r in ("onnxruntime", "openvino"))
    assert any(f"{k} " in ort_line for k in INT8_KERNELS) and "I8" in ov_line  # integer kernels among the timed ops


def test_variants_apply_where_the_network_has_sites(tiny_pipeline, tiny_dit):
    unet, dit = load_denoiser(tiny_pipeline), load_denoiser(tiny_dit)
    # the default graph (every fast setting) is not timed twice: its variant (all glue, attention, shared and
    # symmetric grids) is left out
    assert list(variants(unet)) == [PREVIOUS, GLUE, GLUE_NO_SPLIT, ATTENTION, GLUE_ATTENTION, GLUE_ATTENTION_SHARED,
                                    SYMMETRIC]
    assert list(variants(unet, "split")) == [GLUE] and list(variants(unet, "previous")) == [PREVIOUS]
    # a DiT has attention but no glue points
    assert list(variants(dit)) == [PREVIOUS, ATTENTION, ATTENTION_SHARED, SYMMETRIC]
    assert variants(unet, "shared")[GLUE_ATTENTION_SHARED].share and variants(dit, "shared")[ATTENTION_SHARED].share
    sym = variants(dit, "symmetric")
    assert list(sym) == [PREVIOUS, ATTENTION_SHARED, SYMMETRIC]
    assert sym[SYMMETRIC] == Variant(symmetric=True) and sym[PREVIOUS] == Variant()


@pytest.mark.slow  # about a minute: three calibrations and exports, four timed backends
def test_unet_glue_backends_against_the_yardstick(tiny_pipeline, tmp_path):
    rows, md = run_bench(tmp_path, "--only", "demo", "--model", str(tiny_pipeline), "--variants", "split")
    assert set(rows.backend) == backends(bench.INT8, GLUE)
    codes = integer_codes(params_from_dict({}))
    assert f"quantize_static yardstick: reduce_range={codes.reduce_range}" in md
    assert ("W8 (7-bit codes) export safetensors" in md) == codes.reduce_range
    check_verdicts(rows, md)
    glue_row = next(ln for ln in md.splitlines() if ln.startswith("| int8 + glue |"))
    assert "QLinearAdd" in glue_row and "sites" in glue_row


@pytest.mark.slow  # about 20 s: three calibrations and exports of the DiT, timed backends
def test_dit_is_fed_its_class_labels_and_its_attention_runs_on_integer_kernels(tiny_dit, tmp_path):
    rows, md = run_bench(tmp_path, "--only", "dit", "--dit-model", str(tiny_dit), "--variants", "symmetric")
    assert set(rows.backend) == backends(bench.INT8, PREVIOUS, ATTENTION_SHARED, SYMMETRIC)
    check_verdicts(rows, md)
    assert "No glue backend" in md
    default, previous = (next(ln for ln in md.splitlines() if ln.startswith(f"| {b} |"))
                         for b in ("int8", "int8, previous defaults"))
    # the default graph quantizes attention's matmuls (softmax on 8 bits); the previous defaults kept them in float
    assert "default settings" in default and "QLinearMatMul" in default and "softmax_bits 8" in default
    assert "QLinearMatMul" not in previous and "glue in float" in previous
    nncf = next(ln for ln in md.splitlines() if ln.startswith(f"| {bench.NNCF} |"))
    assert "not PQD" in nncf and "u8" in nncf  # OpenVINO runs NNCF's graph on integer kernels too
