"""The exact rewrites of traced quantized graphs (pqd.deploy.onnx): zero padding folded into the quantized
convolution that reads it, per-tensor QuantizeLinear moved above a Transpose/Reshape, equal quantizers of one value
merged (only where equal in every time group), a group norm's affine as one BatchNormalization. Each leaves
onnxruntime's outputs unchanged and the graph in the shape it is meant to."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pqd.deploy.rewrite import (affine_as_batchnorm, drop_unused, fold_pads, merge_equal_quantizers,
                                quantize_before_layout, signed_activation_grids, unsigned_activation_grids)

RNG = np.random.default_rng(0)


def _model(nodes, inits, x_shape):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _qdq(src, dst):
    return [helper.make_node("QuantizeLinear", [src, "s", "z"], [dst + "_q"]),
            helper.make_node("DequantizeLinear", [dst + "_q", "s", "z"], [dst])]


QP = {"s": np.array(0.03, np.float32), "z": np.array(120, np.uint8)}


def test_zero_padding_folds_into_the_quantized_convolution():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Pad", ["x", "pads", "zero"], ["p"], mode="constant"), *_qdq("p", "pd"),
             helper.make_node("Conv", ["pd", "w"], ["y"], strides=[2, 2])]
    inits = {**QP, "w": w, "pads": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "zero": np.array(0, np.float32)}
    m = _model(nodes, inits, [2, 3, 8, 8])
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = _run(m, x)
    folded = fold_pads(m)
    assert [n.op_type for n in folded.graph.node] == ["QuantizeLinear", "DequantizeLinear", "Conv"]
    assert list(folded.graph.node[2].attribute[-1].ints) == [0, 0, 1, 1]
    np.testing.assert_array_equal(_run(folded, x), before)


def test_padding_that_is_not_zero_stays():
    nodes = [helper.make_node("Pad", ["x", "pads", "one"], ["p"], mode="constant"), *_qdq("p", "pd"),
             helper.make_node("Conv", ["pd", "w"], ["y"])]
    inits = {**QP, "w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "pads": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "one": np.array(1, np.float32)}
    assert "Pad" in [n.op_type for n in fold_pads(_model(nodes, inits, [2, 3, 8, 8])).graph.node]


def test_quantize_moves_above_transpose_and_reshape():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("Reshape", ["t", "shape"], ["r"]),
             *_qdq("r", "y")]
    m = _model(nodes, {**QP, "shape": np.array([-1, 6], np.int64)}, [2, 6, 4])
    x = RNG.standard_normal((2, 6, 4)).astype(np.float32) * 2
    before = _run(m, x)
    moved = quantize_before_layout(m)
    assert [n.op_type for n in moved.graph.node] == ["QuantizeLinear", "Transpose", "Reshape", "DequantizeLinear"]
    np.testing.assert_array_equal(_run(moved, x), before)


def test_quantize_stays_where_the_moved_value_has_other_readers():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), *_qdq("t", "d"),
             helper.make_node("Add", ["d", "t"], ["y"])]
    m = _model(nodes, QP, [2, 6, 4])
    assert [n.op_type for n in quantize_before_layout(m).graph.node][0] == "Transpose"


def test_quantize_stays_in_front_of_a_matmul_it_feeds():
    """x -> Transpose -> Q -> DQ -> MatMul (how the attention's head split is traced) keeps its Q -> DQ pair in front
    of the MatMul, which OpenVINO reads as one FakeQuantize; the same Q in front of a Conv moves above the Transpose."""
    k = RNG.standard_normal((2, 4, 6)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), *_qdq("t", "a"), *_qdq("k", "b"),
             helper.make_node("MatMul", ["a", "b"], ["y"])]
    m = _model(nodes, {**QP, "k": k}, [2, 4, 6])
    assert [n.op_type for n in quantize_before_layout(m).graph.node][:3] == ["Transpose", "QuantizeLinear",
                                                                              "DequantizeLinear"]
    w = RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]), *_qdq("t", "a"),
             helper.make_node("Conv", ["a", "w"], ["y"])]
    m = _model(nodes, {**QP, "w": w}, [2, 8, 8, 3])
    assert [n.op_type for n in quantize_before_layout(m).graph.node][:2] == ["QuantizeLinear", "Transpose"]


def test_equal_quantizers_of_one_value_merge_across_every_group():
    """Two QuantizeLinear of x with equal parameters in both groups merge; a third, equal in group 0 only, stays."""
    nodes = [helper.make_node("QuantizeLinear", ["x", f"s{i}", f"z{i}"], [f"q{i}"]) for i in range(3)]
    nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"]) for i in range(3)]
    nodes += [helper.make_node("Sum", ["d0", "d1", "d2"], ["y"])]
    z = np.array(120, np.uint8)
    inits = {"s0": np.array(0.03, np.float32), "s1": np.array(0.03, np.float32), "s2": np.array(0.03, np.float32),
             "z0": z, "z1": z, "z2": z}
    m = _model(nodes, inits, [2, 5])
    values = [{"s0": np.float32(0.03), "s1": np.float32(0.03), "s2": np.float32(0.03)},
              {"s0": np.float32(0.05), "s1": np.float32(0.05), "s2": np.float32(0.07)}]
    x = RNG.standard_normal((2, 5)).astype(np.float32)
    before = _run(m, x)
    merge_equal_quantizers(m, values)
    quantizers = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert [n.input[1] for n in quantizers] == ["s0", "s2"]
    assert [n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"] == ["q0", "q0", "q2"]
    np.testing.assert_array_equal(_run(m, x), before)


def test_group_norm_affine_becomes_one_batchnorm():
    c = 4
    w = RNG.standard_normal((c, 1, 1)).astype(np.float32)
    b = RNG.standard_normal((c, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "grouped"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["n"], epsilon=1e-5),
             helper.make_node("Reshape", ["n", "shape"], ["m"]),
             helper.make_node("CastLike", ["w", "m"], ["wc"]), helper.make_node("Mul", ["m", "wc"], ["p"]),
             helper.make_node("CastLike", ["b", "p"], ["bc"]), helper.make_node("Add", ["p", "bc"], ["y"])]
    inits = {"grouped": np.array([2, 2, -1], np.int64), "shape": np.array([2, c, 3, 3], np.int64),
             "ones": np.ones(2, np.float32), "zeros": np.zeros(2, np.float32), "w": w, "b": b}
    m = _model(nodes, inits, [2, c, 3, 3])
    x = RNG.standard_normal((2, c, 3, 3)).astype(np.float32)
    before = _run(m, x)
    affine_as_batchnorm(m)
    drop_unused(m)
    assert [n.op_type for n in m.graph.node] == ["Reshape", "InstanceNormalization", "Reshape", "BatchNormalization"]
    assert not {"w", "b"} & {t.name for t in m.graph.initializer}
    np.testing.assert_allclose(_run(m, x), before, rtol=0, atol=1e-6)


def test_middle_code_zero_points_become_signed_grids_only_where_every_group_has_one():
    """uint8 with zero point 128 is int8 with zero point 0: the same outputs. A zero point that is 128 in one time
    group's graph but not in another's stays uint8 (the groups share one graph structure)."""
    nodes = [*_qdq("x", "a"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s2", "z2"], ["r_q"]),
             helper.make_node("DequantizeLinear", ["r_q", "s2", "z2"], ["y"])]
    m = _model(nodes, {"s": np.array(0.03, np.float32), "z": np.array(128, np.uint8),
                       "s2": np.array(0.02, np.float32), "z2": np.array(128, np.uint8)}, [2, 3, 8])
    x = RNG.standard_normal((2, 3, 8)).astype(np.float32) * 3
    before = _run(m, x)
    values = [{"z2": np.array(128, np.uint8)}, {"z2": np.array(100, np.uint8)}]
    signed_activation_grids(m, values)
    zp = {t.name: t.data_type for t in m.graph.initializer}
    assert zp["z"] == TensorProto.INT8 and zp["z2"] == TensorProto.UINT8
    assert values[0]["z2"].dtype == np.uint8
    np.testing.assert_array_equal(_run(m, x), before)
    # and back, where onnxruntime opens the graph: uint8 grids again, the same outputs
    assert unsigned_activation_grids(m) == 1
    assert {t.name: t.data_type for t in m.graph.initializer}["z"] == TensorProto.UINT8
    np.testing.assert_array_equal(_run(m, x), before)
