"""The deployable artifact: ONNX graphs with int8 weights that onnxruntime runs with integer kernels."""

import copy

import numpy as np
import onnx
import pytest
import torch

from pqd import deploy
from pqd.api import load_pipeline
from pqd.diffusion.quantized import load_denoiser_from_export, load_quantized_net
from pqd.formats.export import write_export, write_manifest
from pqd.core.modules import quant_layers
from pqd.core.quantize import apply_qstate, fit_qstate, QuantConfig
from pqd.core.timegroups import TimeGroups
from pqd.diffusion.adapter import Denoiser, load_denoiser
from support.models import fit_two_groups, fp_simulated_deployed

GROUPS = TimeGroups((50.0,))  # group 0: t > 50, group 1: t < 50


def calibrated(den: Denoiser, weight_bits: int):
    """A state with 2 time groups (very different input ranges), split skip inputs and quantized outputs."""
    return fit_two_groups(den, weight_bits, den.skip_splits())


# on this tiny random UNet the deployed graph deviates from the simulation by a small share of the quantization
# error (single-step rounding flips, see the next test); a quarter of it is a generous bound for this model
AGREEMENT = 0.25


def exported(pipeline, den: Denoiser, state, out):
    """The export of ``state`` (time groups GROUPS) with its ONNX graphs, in the new folder ``out``."""
    out.mkdir()
    write_export(pipeline, den.net, state, GROUPS, out, float_dtype=torch.float32)
    deploy.write_onnx(load_quantized_net(out, verify=False), GROUPS, den, out / deploy.ONNX_DIR)
    write_manifest(out, {})
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_pipeline):
    den = load_denoiser(tiny_pipeline)
    state = calibrated(den, 7)
    return den, state, exported(tiny_pipeline, den, state, tmp_path_factory.mktemp("deploy") / "export")


@pytest.mark.parametrize("runtime", deploy.RUNTIMES)
def test_onnx_int8_matches_the_torch_fake_quant_model(artifact, runtime):
    """Both compute the same integer arithmetic; the deviation must stay far below the quantization error."""
    den, _, out = artifact
    y_fp, y_q, y_deployed = fp_simulated_deployed(den, out, runtime)  # both time groups in one batch
    quant_error = (y_q - y_fp).norm()
    assert quant_error > 0
    assert (y_deployed - y_q).norm() <= AGREEMENT * quant_error


def test_openvino_and_onnxruntime_agree_on_the_same_artifact(artifact):
    """The same QDQ files in two runtimes: their outputs differ by rounding flips only, within the bound above."""
    den, _, out = artifact
    y_fp, y_q, y_ort = fp_simulated_deployed(den, out, "onnxruntime")
    _, _, y_ov = fp_simulated_deployed(den, out, "openvino")
    assert not torch.equal(y_ov, y_q)  # a real second runtime, not the simulation
    assert (y_ov - y_ort).norm() <= AGREEMENT * (y_q - y_fp).norm()


@pytest.mark.parametrize("runtime", deploy.RUNTIMES)
def test_kernel_audit_finds_every_quantized_layer_on_an_integer_kernel(artifact, runtime):
    den, state, out = artifact
    a = deploy.kernel_audit(out / deploy.ONNX_DIR / deploy.graph_file(0), runtime)
    splits = sum(1 for lp in state.values() if lp.act_split)
    assert a.quantized_layers == len(state) + splits  # a split layer is two convolutions in the graph
    assert a.fallbacks == ()
    # conv_out keeps its float output: onnxruntime has no integer convolution with a float output, OpenVINO has
    expected_float = 1 if runtime == "onnxruntime" else 0
    assert len(a.float_output) == expected_float and a.integer_layers == a.quantized_layers - expected_float
    assert all(n.startswith("unet.conv_out") for n in a.float_output)


def test_single_layer_matches_within_one_output_step():
    """The tolerance above, justified on one layer: the integer kernel's uint8 output equals the simulated
    one except where float rounding lands on the other side of a grid midpoint (one step, rarely)."""
    from pqd.core.timegroups import set_time_group
    from pqd.core.modules import set_onnx_mode

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1)).eval()
    x = torch.randn(8, 16, 12, 12) * 3
    state = fit_qstate(model, lambda m, sg: m(x), QuantConfig(weight_bits=7, output_layers=frozenset({"0"})))
    q = apply_qstate(copy.deepcopy(model), state)
    set_time_group(q, 0)
    import onnxruntime as ort

    set_onnx_mode(q, True)
    graph = deploy.export_graph(q, (x,), ["x"], ["y"])
    set_onnx_mode(q, False)
    sess = ort.InferenceSession(graph.SerializeToString(), deploy.session_options(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = q(x).numpy()
    step = float(state["0"].out_scale[0, 0])
    diff = np.abs(y - ref)
    assert diff.max() <= step * 1.001
    assert (diff > 1e-6).mean() < 0.001


def test_int8_initializers_are_really_int8(artifact):
    den, state, out = artifact
    path = out / deploy.ONNX_DIR / deploy.graph_file(0)
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    # weights: the int8 initializers that a per-channel DequantizeLinear reads (a split layer's two input-channel
    # slices are folded into two initializers by the exporter)
    weights = [n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    splits = sum(1 for lp in state.values() if lp.act_split)
    assert len(weights) == len(state) + splits
    values = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}  # + weights.bin
    assert sum(values[w].size for w in weights) == sum(lp.weight_int.numel() for lp in state.values())
    for w in weights:
        if values[w].nbytes >= deploy.onnx._INLINE_MAX:
            assert inits[w].data_location == onnx.TensorProto.EXTERNAL  # stored once, in weights.bin
        assert values[w].dtype == np.int8 and -64 <= values[w].min() and values[w].max() <= 63  # 7-bit codes
        layer = w.removeprefix("unet.").removesuffix(".weight_int")
        if layer in state:
            assert np.array_equal(values[w], state[layer].weight_int.numpy())
    float_weights = [t for t in m.graph.initializer if t.name.endswith(".weight") and t.name.removeprefix("unet.")
                     .removesuffix(".weight") in state]
    assert not float_weights  # no float copy of a quantized weight ships


def test_integer_kernels_run_for_every_quantized_conv(artifact):
    den, state, out = artifact
    report = deploy.kernel_report(out / deploy.ONNX_DIR / deploy.graph_file(0))
    convs = {n: lp for n, lp in state.items() if lp.kind == "conv2d" and lp.out_scale is not None}
    expected = sum(2 if lp.act_split else 1 for lp in convs.values())
    assert report["int8"].get("QLinearConv", 0) == expected
    assert report["float"].get("Conv", 0) == 1  # conv_out: its output (the noise prediction) stays float
    linears = sum(1 for lp in state.values() if lp.kind == "linear")
    assert report["int8"].get("QGemm", 0) + report["int8"].get("MatMulIntegerToFloat", 0) == linears


def test_time_group_switch_in_the_deployed_model(artifact):
    den, state, out = artifact
    ort = deploy.load_deployed_denoiser(out)
    x = torch.randn(3, *den.sample_shape, generator=torch.Generator().manual_seed(2))
    g0 = ort.run_group(x, torch.full((3,), 80.0), 0)
    g1 = ort.run_group(x, torch.full((3,), 80.0), 1)
    assert not torch.allclose(g0, g1)  # the graphs carry different activation parameters
    t = torch.tensor([80.0, 20.0, 80.0])
    mixed = ort.predict(x, t)
    assert torch.equal(mixed[[0, 2]], g0[[0, 2]])
    assert torch.equal(mixed[1], ort.run_group(x[1:2], t[1:2], 1)[0])

def test_groups_share_one_copy_of_the_weights(artifact):
    den, state, out = artifact
    weights = (out / deploy.ONNX_DIR / deploy.WEIGHTS_FILE).stat().st_size
    codes = sum(lp.weight_int.numel() for lp in state.values())  # int8: one byte each
    floats = sum(v.numel() * 4 for k, v in den.net.state_dict().items() if not k.endswith(".weight")
                 or k.removesuffix(".weight") not in state)
    assert codes <= weights <= 1.5 * (codes + floats)  # once, not once per time group


def test_load_pipeline_round_trip(artifact):
    from diffusers import DiffusionPipeline

    den, state, out = artifact
    pipe = load_pipeline(out)
    assert isinstance(pipe, DiffusionPipeline)
    assert set(quant_layers(pipe.unet)) == set(state)
    qden = load_denoiser_from_export(out)
    x = torch.randn(2, *den.sample_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in (80.0, 20.0):  # the pipeline's UNet picks the time group from the timestep by itself
            assert torch.equal(pipe.unet(x, torch.tensor(t)).sample, qden.predict(x, torch.tensor(t)))
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


@pytest.mark.parametrize("runtime", deploy.RUNTIMES)
def test_load_pipeline_on_a_runtime_runs_the_deployed_graphs(artifact, runtime):
    den, _, out = artifact
    pipe = load_pipeline(out, runtime=runtime)
    deployed = deploy.load_deployed_denoiser(out, runtime)
    x = torch.randn(2, *den.sample_shape, generator=torch.Generator().manual_seed(3))
    for t in (80.0, 20.0):
        assert torch.equal(pipe.unet(x, torch.tensor(t)).sample, deployed.predict(x, torch.tensor(t)))
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    with pytest.raises(Exception, match="runtime = 'tensorrt' is not allowed: expected one of torch, onnxruntime, openvino"):
        load_pipeline(out, runtime="tensorrt")


def test_load_pipeline_refuses_a_modified_file(artifact, tmp_path):
    import shutil

    from pqd.errors import ArtifactError

    _, _, out = artifact
    bad = tmp_path / "export"
    shutil.copytree(out, bad)
    with open(bad / "qmap.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="qmap.json was modified"):
        load_pipeline(bad)


def w4_graph():
    """(the traced graph of a W4 convolution + linear, its qstate, its input): int8 code initializers, not packed."""
    from pqd.core.modules import set_onnx_mode

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(16 * 36, 10))
    x = torch.randn(4, 8, 6, 6)
    state = fit_qstate(model.eval(), lambda m, sg: m(x), QuantConfig(weight_bits=4, output_layers=frozenset({"0"})))
    q = apply_qstate(copy.deepcopy(model), state)
    set_onnx_mode(q, True)
    graph = deploy.export_graph(q, (x,), ["x"], ["y"])
    set_onnx_mode(q, False)
    return graph, state, x


def test_w4_graph_stores_the_4bit_codes_as_int4_and_runs_them_on_int8_kernels(tmp_path):
    """4-bit codes are traced as int8 initializers on the 4-bit grid and written as INT4 (two a byte); each runtime
    widens them back and runs the same int8 kernels, with the outputs of the int8-stored graph."""
    graph, state, x = w4_graph()
    codes = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer if t.name.endswith("weight_int")}
    assert sorted(codes) == ["0.weight_int", "2.weight_int"]
    for name, c in codes.items():
        assert c.dtype == np.int8 and c.min() >= -8 and c.max() <= 7
        assert np.array_equal(c, state[name.removesuffix(".weight_int")].weight_int.numpy())
    onnx.save(graph, tmp_path / "w8.onnx")
    assert deploy.pack_int4(graph) == 2
    packed = {t.name: t for t in graph.graph.initializer if t.name in codes}
    for name, t in packed.items():
        assert t.data_type == onnx.TensorProto.INT4 and len(t.raw_data) == (codes[name].size + 1) // 2
        assert np.array_equal(onnx.numpy_helper.to_array(t).astype(np.int8), codes[name])
    onnx.save(graph, tmp_path / "w4.onnx")
    assert (tmp_path / "w4.onnx").stat().st_size < (tmp_path / "w8.onnx").stat().st_size - 16 * 72 // 2
    feeds = {"x": x.numpy()}
    for runtime in deploy.RUNTIMES:
        want = deploy.open_graph(tmp_path / "w8.onnx", runtime).run(feeds)
        assert np.array_equal(deploy.open_graph(tmp_path / "w4.onnx", runtime).run(feeds), want)
        audit = deploy.kernel_audit(tmp_path / "w4.onnx", runtime)
        assert audit.integer_layers == audit.quantized_layers == 2 and not audit.fallbacks, audit.line()


def test_w4_graph_with_hard_linked_external_data_opens(tmp_path):
    """DVC checks an export out of its cache as hard links: a W4 graph whose weights.bin has a second link opens and
    computes what the graph with inline weights does (onnx's own external-data loader refuses such a file), and an
    external-data location outside the graph's folder is refused."""
    import os

    from pqd.deploy.int4 import load_external_data, runnable_graph

    graph, _, x = w4_graph()
    assert deploy.pack_int4(graph) == 2
    onnx.save(graph, tmp_path / "inline.onnx")
    (tmp_path / "g").mkdir()
    onnx.save_model(graph, tmp_path / "g/graph.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    os.link(tmp_path / "g/weights.bin", tmp_path / "cache-copy.bin")
    assert (tmp_path / "g/weights.bin").stat().st_nlink == 2
    assert isinstance(runnable_graph(tmp_path / "g/graph.onnx"), bytes)  # INT4: widened in memory
    feeds = {"x": x.numpy()}
    for runtime in deploy.RUNTIMES:
        want = deploy.open_graph(tmp_path / "inline.onnx", runtime).run(feeds)
        assert np.array_equal(deploy.open_graph(tmp_path / "g/graph.onnx", runtime).run(feeds), want)
    bad = onnx.load(str(tmp_path / "g/graph.onnx"), load_external_data=False)
    ext = next(t for t in bad.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in ext.external_data if e.key == "location").value = "../cache-copy.bin"
    with pytest.raises(ValueError, match="outside"):
        load_external_data(bad, tmp_path / "g")


def test_per_group_weights_deploy_weight_only_and_agree_in_both_runtimes(tiny_pipeline, tmp_path):
    """4-bit weights with a scale per 8 input channels: the graphs carry them as a blocked DequantizeLinear (opset 21)
    of INT4 codes; both runtimes compute what the simulation does, and the kernel audit counts each grouped layer as
    weight-only (not a fallback) and every other one on an integer kernel."""
    den = load_denoiser(tiny_pipeline)
    state = fit_two_groups(den, 4, den.skip_splits(), group_size=8)
    grouped = {n for n, lp in state.items() if lp.weight_scale.ndim == 2}
    assert grouped and len(grouped) < len(state)  # layers with at most 8 input channels stay per channel
    out = exported(tiny_pipeline, den, state, tmp_path / "export")
    path = out / deploy.ONNX_DIR / deploy.graph_file(0)
    graph = onnx.load(str(path), load_external_data=False)
    blocked = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    splits = sum(1 for n in grouped if state[n].act_split)
    assert len(blocked) == len(grouped) and max(o.version for o in graph.opset_import if o.domain == "") == 21
    codes = {t.name: t for t in graph.graph.initializer}
    assert all(codes[n.input[0]].data_type == onnx.TensorProto.INT4 for n in blocked)
    for runtime in deploy.RUNTIMES:
        y_fp, y_q, y_deployed = fp_simulated_deployed(den, out, runtime)
        assert (y_deployed - y_q).norm() <= AGREEMENT * (y_q - y_fp).norm(), runtime
        a = deploy.kernel_audit(path, runtime)
        assert a.fallbacks == () and len(a.weight_only) == len(grouped) + splits, a.line()
        assert a.integer_layers == a.quantized_layers - len(a.weight_only) - len(a.float_output), a.line()
        assert "weight-only by design" in a.line()


def test_symmetric_activation_grids_deploy_as_int8_without_zero_points(tiny_pipeline, tmp_path):
    """quant.act_symmetric: every activation zero point is 0 or the middle code; the graphs carry the signed ones as
    int8 grids with zero point 0 and the others as uint8 from 0, so no runtime has an offset to subtract. Both runtimes
    compute what the simulation does and run every quantized layer on an integer kernel."""
    den = load_denoiser(tiny_pipeline)
    state = fit_two_groups(den, 7, den.skip_splits(), symmetric=True)
    zps = torch.cat([t.reshape(-1) for lp in state.values() for t in (lp.act_zero_point, lp.out_zero_point)
                     if t is not None])
    assert set(zps.tolist()) <= {0.0, 128.0} and 128.0 in zps.tolist()  # the tiny UNet's layers read signed tensors
    out = exported(tiny_pipeline, den, state, tmp_path / "export")
    path = out / deploy.ONNX_DIR / deploy.graph_file(0)
    graph = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    act = [inits[n.input[2]] for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert act and all(int(z.reshape(-1)[0]) == 0 for z in act)
    assert np.dtype(np.int8) in {z.dtype for z in act}
    for runtime in deploy.RUNTIMES:
        y_fp, y_q, y_deployed = fp_simulated_deployed(den, out, runtime)
        assert (y_deployed - y_q).norm() <= AGREEMENT * (y_q - y_fp).norm(), runtime
        a = deploy.kernel_audit(path, runtime)
        assert a.fallbacks == () and a.integer_layers == a.quantized_layers - len(a.float_output), a.line()
