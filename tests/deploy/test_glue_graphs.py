"""Glue between integer kernels (quant.glue) in the deployed graphs: the quantized sites ship in the export, the
ONNX graphs compute what the torch model computes, and onnxruntime runs each site's op as an integer kernel."""

import torch
import pytest

from pqd import deploy
from pqd.core.quantize import SiteQParams, qstate_of
from pqd.core.timegroups import TimeGroups
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.glue import GLUE_KINDS, glue_sites, install_sites
from pqd.diffusion.quantized import load_quantized_net
from pqd.formats.export import write_export, write_manifest
from support.models import fit_two_groups, fp_simulated_deployed

GROUPS = TimeGroups((50.0,))


@pytest.fixture(scope="module")
def glued(tmp_path_factory, tiny_pipeline):
    """Every glue kind, 2 time groups with very different input ranges, outputs quantized, no split."""
    den = load_denoiser(tiny_pipeline)
    names = install_sites(den.net, glue_sites(den.net, GLUE_KINDS, den.skip_splits(), split=False))
    state = fit_two_groups(den)
    out = tmp_path_factory.mktemp("glue") / "export"
    out.mkdir()
    write_export(tiny_pipeline, den.net, state, GROUPS, out, float_dtype=torch.float32)
    deploy.write_onnx(load_quantized_net(out, verify=False), GROUPS, den, out / deploy.ONNX_DIR)
    write_manifest(out, {})
    return den, names, state, out


def test_sites_are_calibrated_per_group_and_ship_in_the_export(glued):
    den, names, state, out = glued
    fitted = {n: sp for n, sp in state.items() if isinstance(sp, SiteQParams)}
    assert sorted(fitted) == sorted(names)
    assert all(sp.scale.shape == (2, 1) and not torch.equal(sp.scale[0], sp.scale[1]) for sp in fitted.values())
    rebuilt = qstate_of(load_quantized_net(out))
    for n, sp in fitted.items():
        assert torch.equal(rebuilt[n].scale, sp.scale) and torch.equal(rebuilt[n].zero_point, sp.zero_point)


def test_deployed_graph_matches_the_torch_model(glued):
    den, _, _, out = glued
    y_fp, y_q, y_ort = fp_simulated_deployed(den, out)  # both time groups in one batch
    quant_error = (y_q - y_fp).norm()
    assert quant_error > 0
    assert (y_ort - y_q).norm() <= 0.25 * quant_error  # the bound of tests/deploy/test_onnx_graphs.py


def test_every_site_runs_as_an_integer_kernel(glued):
    _, names, _, out = glued
    report = deploy.kernel_report(out / deploy.ONNX_DIR / deploy.graph_file(0))
    count = lambda suffix: sum(n.endswith(suffix) for n in names)  # noqa: E731
    # residual adds of ResNet and attention blocks and the time-embedding adds
    assert report["int8"].get("QLinearAdd", 0) == count(".glue_residual") + count(".glue_temb")
    assert report["int8"].get("QLinearSigmoid", 0) == count("_in") == report["int8"].get("QLinearMul", 0)
    assert report["int8"].get("QLinearConcat", 0) == count(".glue_concat") > 0
