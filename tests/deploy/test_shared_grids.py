"""Glue between integer kernels (quant.glue) and one grid per tensor (quant.share_grids) in the deployed graphs.

The glue sites are calibrated per time group and ship in the export, and onnxruntime runs each site's op as an
integer kernel. The quantizers that see one tensor are found in a diffusers UNet, share their parameters in the
fitted state and one module in the quantized model, and the deployed graph computes what the torch model computes
with fewer QuantizeLinear/DequantizeLinear nodes left after onnxruntime's fusions."""

import copy
import collections

import onnx
import onnxruntime as ort
import pytest
import torch

from pqd import deploy
from pqd.core.modules import quant_layers, quant_matmuls
from pqd.core.quantize import SiteQParams, apply_qstate, qstate_of
from pqd.core.sharing import share_qparams, shared_inputs, tie_quantizers
from pqd.core.timegroups import TimeGroups
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.attention import use_matmul_attention
from pqd.diffusion.glue import GLUE_KINDS, glue_sites, install_sites, resampling_convs
from pqd.diffusion.quantized import load_quantized_net
from pqd.formats.export import write_export, write_manifest
from support.models import fit_two_groups, fp_simulated_deployed

# two whole-network ONNX exports (with and without shared grids) in its module fixture: make test-fast
# leaves it out (tests/deploy/test_onnx_graphs.py keeps the ONNX export in the fast suite)
pytestmark = pytest.mark.slow

GROUPS = TimeGroups((50.0,))


def _den(tiny_pipeline):
    den = load_denoiser(tiny_pipeline)
    install_sites(den.net, glue_sites(den.net, GLUE_KINDS, den.skip_splits(), split=False))
    use_matmul_attention(den.net)
    return den


def _groups(den):
    x = torch.randn(2, *den.sample_shape, generator=torch.Generator().manual_seed(3))
    outputs = [n for n in quant_layers_names(den) if n not in den.float_output_layers(quant_layers_names(den))]
    return shared_inputs(den.net, lambda m: m(x, torch.tensor([80.0, 20.0])), outputs=outputs,
                         through=resampling_convs(den.net))


def quant_layers_names(den):
    return [n for n, m in den.net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def _export(den, tiny_pipeline, state, out):
    out.mkdir()
    write_export(tiny_pipeline, den.net, state, GROUPS, out, float_dtype=torch.float32)
    deploy.write_onnx(load_quantized_net(out, verify=False), GROUPS, den, out / deploy.ONNX_DIR)
    write_manifest(out, {})
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_pipeline):
    """Every glue kind (no split), attention's matmuls, 2 time groups with very different input ranges; exported
    with and without shared grids."""
    den = _den(tiny_pipeline)
    groups = _groups(den)
    state = fit_two_groups(den)
    sharing, applied = share_qparams(state, groups)
    tmp = tmp_path_factory.mktemp("shared")
    own = copy.deepcopy(den.net)  # without shared grids: group 0's graph only, for its node counts
    onnx.save(deploy.trace_group(apply_qstate(own, state), 0, den), tmp / "own.onnx")
    return den, groups, applied, sharing, _export(den, tiny_pipeline, sharing, tmp / "shared"), tmp / "own.onnx"


def _site_names(den):
    return [n for n, _ in den.net.named_modules() if n.rpartition(".")[2].startswith("glue_")]


def test_sites_are_calibrated_per_group_and_ship_in_the_export(shared):
    den, _, _, state, out, _ = shared
    names = _site_names(den)
    fitted = {n: sp for n, sp in state.items() if isinstance(sp, SiteQParams)}
    assert names and sorted(fitted) == sorted(names)
    assert all(sp.scale.shape == (2, 1) and not torch.equal(sp.scale[0], sp.scale[1]) for sp in fitted.values())
    rebuilt = qstate_of(load_quantized_net(out))
    for n, sp in fitted.items():
        assert torch.equal(rebuilt[n].scale, sp.scale) and torch.equal(rebuilt[n].zero_point, sp.zero_point)


def test_every_site_runs_as_an_integer_kernel(shared):
    den, *_, out, _ = shared
    names = _site_names(den)
    report = deploy.kernel_report(out / deploy.ONNX_DIR / deploy.graph_file(0))
    count = lambda suffix: sum(n.endswith(suffix) for n in names)  # noqa: E731
    # residual adds of ResNet and attention blocks and the time-embedding adds
    assert report["int8"].get("QLinearAdd", 0) == count(".glue_residual") + count(".glue_temb")
    assert report["int8"].get("QLinearSigmoid", 0) == count("_in") == report["int8"].get("QLinearMul", 0)
    assert report["int8"].get("QLinearConcat", 0) == count(".glue_concat") > 0


def test_the_quantizers_of_one_tensor_are_found(shared):
    den, groups, applied, *_ = shared
    found = {tuple(g) for g in groups}
    attentions = [n for n, m in den.net.named_modules() if type(m).__name__ == "Attention"]
    for a in attentions:  # query, key and value read the normalised states; each projection feeds a matmul operand
        assert ((f"{a}.to_q", "in"), (f"{a}.to_k", "in"), (f"{a}.to_v", "in")) in found
        assert ((f"{a}.to_q", "out"), (f"{a}.processor.qk", "a")) in found
        assert ((f"{a}.to_k", "out"), (f"{a}.processor.qk", "b")) in found
        assert ((f"{a}.to_v", "out"), (f"{a}.processor.pv", "b")) in found
    concat = [b.rpartition(".")[0] for b in den.skip_splits()]
    assert concat and all(((f"{b}.glue_concat", "in"), (f"{b}.conv_shortcut", "in")) in found for b in set(concat))
    # the samplers' convolutions read their block's input through zero padding / nearest upsampling
    samplers = resampling_convs(den.net)
    assert samplers and all(any((c, "in") in g[1:] for g in groups) for c in samplers)
    assert applied == groups  # every member is quantized on one part at 8 bits here


def test_members_hold_the_lead_step_and_zero_point(shared):
    den, _, applied, state, *_ = shared
    q = copy.deepcopy(den.net)
    apply_qstate(q, state)
    assert tie_quantizers(q, applied) == sum(len(g) - 1 for g in applied)
    owners = {**quant_layers(q), **quant_matmuls(q)}
    attr = {"in": "act", "out": "out", "a": "qa", "b": "qb"}
    for (lead, side), *members in applied:
        lead_q = getattr(owners[lead], attr[side]) if lead in owners else q.get_submodule(lead)
        for name, role in members:
            member = getattr(owners[name], attr[role])
            assert member.scale is lead_q.scale and member.zero_point is lead_q.zero_point and member is not lead_q


def test_deployed_graph_matches_the_torch_model(shared):
    den, *_, out, _ = shared
    y_fp, y_q, y_ort = fp_simulated_deployed(den, out)
    quant_error = (y_q - y_fp).norm()
    assert quant_error > 0
    assert (y_ort - y_q).norm() <= 0.25 * quant_error  # the bound of tests/deploy/test_onnx_graphs.py


def _runtime_nodes(graph, tmp_path, name):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def test_one_quantize_node_per_shared_tensor(shared, tmp_path):
    den, _, _, _, out, own = shared
    graph = out / deploy.ONNX_DIR / deploy.graph_file(0)
    with_sharing, without = _runtime_nodes(graph, tmp_path, "shared"), _runtime_nodes(own, tmp_path, "own")
    attentions = sum(type(m).__name__ == "Attention" for m in den.net.modules())
    # at least: key and value quantize the states query quantizes (one QuantizeLinear, merged), and each such
    # projection's output is the matmul operand as it is (no DequantizeLinear -> QuantizeLinear between)
    assert without["QuantizeLinear"] - with_sharing["QuantizeLinear"] >= 2 * attentions
    assert without["DequantizeLinear"] - with_sharing["DequantizeLinear"] >= 2 * attentions
    assert deploy.kernel_report(graph)["int8"] == deploy.kernel_report(own)["int8"]
