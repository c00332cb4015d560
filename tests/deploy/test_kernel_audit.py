"""The kernel audit refuses a quantized layer that a runtime runs in float (a DequantizeLinear left in front of a
float MatMul), in onnxruntime and in OpenVINO, and the release gate names it."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pqd import deploy
from pqd.formats.metrics import ExportMetrics
from pqd.ops.release import kernels_check

D = 64


def _qdq(x: str, name: str, scale: float) -> list[onnx.NodeProto]:
    """x -> QuantizeLinear -> DequantizeLinear (uint8, one scale, zero point 128)."""
    return [helper.make_node("QuantizeLinear", [x, f"{name}.s", f"{name}.z"], [f"{name}.q"], name=f"{name}/q"),
            helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.z"], [f"{name}.dq"], name=f"{name}/dq")]


def save_graph(path, name: str, nodes: list, inits: list):
    """An opset-21 graph x [8, D] -> y [8, D] of ``nodes``, checked and saved at ``path``."""
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, D])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def graph_with_a_fallback(path):
    """x [8, D] -> QDQ -> MatMul 'fused' (int8 weight, output QDQ) -> Sigmoid (float) -> MatMul 'fallback' (int8
    weight, float activation: no integer kernel can take it) -> QDQ -> MatMul 'tail' (quantized both sides) -> y."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for name, scale in (("in", 0.05), ("mid", 0.05), ("fb", 0.05), ("out", 0.05)):
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}.s"),
                  numpy_helper.from_array(np.array(128, np.uint8), f"{name}.z")]
    for w in ("fused", "fallback", "tail"):
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (D, D)).astype(np.int8), f"{w}.w"),
                  numpy_helper.from_array(np.full(D, 0.002, np.float32), f"{w}.ws"),
                  numpy_helper.from_array(np.zeros(D, np.int8), f"{w}.wz")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{w}.w", f"{w}.ws", f"{w}.wz"], [f"{w}.wdq"],
                                      name=f"{w}/wdq", axis=1))
    nodes += _qdq("x", "in", 0.05)
    nodes.append(helper.make_node("MatMul", ["in.dq", "fused.wdq"], ["h1"], name="fused"))
    nodes += _qdq("h1", "mid", 0.05)
    nodes.append(helper.make_node("Sigmoid", ["mid.dq"], ["h2"], name="sigmoid"))
    nodes.append(helper.make_node("MatMul", ["h2", "fallback.wdq"], ["h3"], name="fallback"))
    nodes += _qdq("h3", "fb", 0.05)
    nodes.append(helper.make_node("MatMul", ["fb.dq", "tail.wdq"], ["h4"], name="tail"))
    nodes += _qdq("h4", "out", 0.05)
    nodes.append(helper.make_node("Identity", ["out.dq"], ["y"], name="y"))
    return save_graph(path, "fallback", nodes, inits)


@pytest.mark.parametrize("runtime", deploy.RUNTIMES)
def test_the_audit_names_the_layer_that_fell_back_to_float(tmp_path, runtime):
    path = graph_with_a_fallback(tmp_path / "g.onnx")
    assert deploy.quantized_layers(path) == (("fused", "fallback", "tail"), (), ())
    a = deploy.kernel_audit(path, runtime)
    assert a.quantized_layers == 3
    assert a.fallbacks == ("fallback",)
    assert sum(a.int8.values()) >= 1 and a.integer_layers == 2
    assert "FELL BACK TO FLOAT: fallback" in a.line()


def export_metrics(kernels) -> ExportMetrics:
    return ExportMetrics(quantized_layers=3, files=1, fp32_unet_bytes=1, export_unet_bytes=1, size_ratio=1.0,
                         packed_int4_layers=0, onnx_graphs=1, onnx_kernels=kernels)


def test_the_release_gate_refuses_a_fallback_by_name(tmp_path):
    path = graph_with_a_fallback(tmp_path / "g.onnx")
    audits = {r: deploy.kernel_report(path, r) for r in deploy.RUNTIMES}
    for backend in ("onnxruntime", "openvino"):
        check = kernels_check(export_metrics(audits), backend)
        assert not check.passed and check.detail.startswith(f"{backend}: 2 of 3 quantized layers")
        assert "FELL BACK TO FLOAT: fallback" in check.detail
    clean = {r: {**a, "fallbacks": [], "integer_layers": 3} for r, a in audits.items()}
    ok = kernels_check(export_metrics(clean), "openvino")
    assert ok.passed and ok.detail.startswith("openvino: 3 of 3 quantized layers on integer kernels (")
    # an export from before the audit: rerun it
    assert not kernels_check(export_metrics({"int8": {"QGemm": 3}, "float": {}}), "onnxruntime").passed


def graph_with_a_repeated_call(path):
    """One layer called twice on the same input (blk/mm and blk/mm_again: a DiT's final norm calls block 0's
    embedding again), each output on its own grid, summed."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (D, D)).astype(np.int8), "blk.w"),
             numpy_helper.from_array(np.full(D, 0.002, np.float32), "blk.ws"),
             numpy_helper.from_array(np.zeros(D, np.int8), "blk.wz")]
    for name in ("in", "o1", "o2", "sum"):
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), f"{name}.s"),
                  numpy_helper.from_array(np.array(128, np.uint8), f"{name}.z")]
    nodes = [helper.make_node("DequantizeLinear", ["blk.w", "blk.ws", "blk.wz"], ["blk.wdq"], name="blk/wdq", axis=1),
             *_qdq("x", "in", 0.05),
             helper.make_node("MatMul", ["in.dq", "blk.wdq"], ["h1"], name="blk/mm"),
             helper.make_node("MatMul", ["in.dq", "blk.wdq"], ["h2"], name="blk/mm_again"),
             *_qdq("h1", "o1", 0.05), *_qdq("h2", "o2", 0.05),
             helper.make_node("Add", ["o1.dq", "o2.dq"], ["s"], name="add"), *_qdq("s", "sum", 0.05),
             helper.make_node("Identity", ["sum.dq"], ["y"], name="y")]
    return save_graph(path, "repeated", nodes, inits)


@pytest.mark.parametrize("runtime", deploy.RUNTIMES)
def test_a_repeated_call_the_runtime_computes_once_is_no_fallback(tmp_path, runtime):
    """OpenVINO keeps one of two identical calls (common subexpression elimination): the other is held by no kernel,
    and runs on the kept call's integer kernel."""
    path = graph_with_a_repeated_call(tmp_path / "g.onnx")
    assert deploy.quantized_layers(path)[0] == ("blk/mm", "blk/mm_again")
    a = deploy.kernel_audit(path, runtime)
    assert a.quantized_layers == 2 and a.fallbacks == () and a.integer_layers == 2, a.line()
