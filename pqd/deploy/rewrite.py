"""Exact rewrites of a traced quantized graph: the same values, in the shapes onnxruntime's and OpenVINO's fusions
take (DequantizeLinear -> Conv -> QuantizeLinear becomes QLinearConv, and so on) where the trace left others.
pqd.deploy.onnx applies :func:`rewrite` to every traced quantized graph (the float graph is left as traced).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


def _constant(graph: onnx.GraphProto, name: str) -> Any:
    """The value of ``name`` where a Constant node or an initializer of ``graph`` holds it, else None."""
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _only(readers: dict[str, list[onnx.NodeProto]], name: str, op_type: str) -> onnx.NodeProto | None:
    """The one node that reads ``name`` (as its first input) if it is an ``op_type``."""
    r = readers.get(name, [])
    return r[0] if len(r) == 1 and r[0].op_type == op_type and r[0].input[0] == name else None


def _forget_shapes(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop the recorded shapes of values a rewrite changed (onnxruntime infers them again)."""
    for v in [v for v in graph.value_info if v.name in names]:
        graph.value_info.remove(v)


def fold_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Zero padding of a quantized convolution's input folded into the convolution (``pads``): Pad(x, 0) ->
    QuantizeLinear -> DequantizeLinear -> Conv becomes QuantizeLinear -> DequantizeLinear -> Conv(pads), which
    onnxruntime runs as one QLinearConv instead of a float Pad before it (diffusers' downsamplers pad right and
    bottom by hand). The same values: a zero is on every activation grid (integer zero point), and Conv pads
    with zeros as the Pad did."""
    g = model.graph
    readers = _readers(g)
    dead = []
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = _constant(g, pad.input[1]) if len(pad.input) > 1 else None
        value = _constant(g, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        q = _only(readers, pad.output[0], "QuantizeLinear")
        dq = q and _only(readers, q.output[0], "DequantizeLinear")
        conv = dq and _only(readers, dq.output[0], "Conv")
        if (mode != b"constant" or pads is None or value is None or float(value) != 0 or len(pads) != 8
                or (pads[:2] != 0).any() or (pads[4:6] != 0).any() or (pads < 0).any() or conv is None
                or (len(pad.input) > 3 and pad.input[3])
                or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute)):
            continue
        have = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        spatial = [int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])]  # H begin, W begin, H end, W end
        for a in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(a)
        conv.attribute.append(onnx.helper.make_attribute("pads", [h + p for h, p in zip(have, spatial)]))
        q.input[0] = pad.input[0]
        _forget_shapes(g, {q.output[0], dq.output[0]})
        dead.append(pad)
    for n in dead:
        g.node.remove(n)
    return model


_LAYOUT = ("Transpose", "Reshape")  # ops that move elements without changing them


def _feeds_matmul(readers: dict[str, list[onnx.NodeProto]], q: onnx.NodeProto) -> bool:
    """Whether ``q``'s value is dequantized for a MatMul (an activation x activation product)."""
    return any(r.op_type == "MatMul" for dq in readers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"
               for r in readers.get(dq.output[0], []))


def quantize_before_layout(model: onnx.ModelProto) -> onnx.ModelProto:
    """A per-tensor QuantizeLinear moved above the Transpose/Reshape it follows (x -> Transpose -> Q becomes x ->
    Q -> Transpose), so that the layout change moves uint8 codes instead of floats (a quarter of the bytes), as
    in onnxruntime's own quantized graphs. The same values: quantizing each element on one grid commutes with
    moving it. A quantizer whose DequantizeLinear feeds a MatMul (attention's Q, K, V and softmax operands) stays
    where it is: OpenVINO reads a QuantizeLinear -> DequantizeLinear pair as one FakeQuantize and fuses the
    attention on its int8 kernels, but a DequantizeLinear alone after the head split as a float Convert and
    Multiply, and runs the attention in f32 (CIFAR-10 UNet, 5.9 ms against NNCF's 1.9 ms per attention block at
    batch 32); it moves the codes through the layout change itself."""
    g = model.graph
    moved = True
    while moved:
        moved = False
        readers = _readers(g)
        producer = {o: n for n in g.node for o in n.output}
        for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
            t = producer.get(q.input[0])
            if t is None or t.op_type not in _LAYOUT or _only(readers, t.output[0], "QuantizeLinear") is not q \
                    or _feeds_matmul(readers, q):
                continue
            scale = _constant(g, q.input[1])
            if scale is None or scale.size != 1:
                continue
            x, y, z = t.input[0], t.output[0], q.output[0]  # x -> t -> y -> q -> z  becomes  x -> q -> y -> t -> z
            q.input[0], q.output[0], t.input[0], t.output[0] = x, y, y, z
            nodes = list(g.node)
            nodes.remove(q)
            nodes.insert(nodes.index(t), q)
            del g.node[:]
            g.node.extend(nodes)
            _forget_shapes(g, {y, z})
            moved = True
            break
    return model


def _float_constant(graph: onnx.GraphProto, name: str, producer: dict[str, onnx.NodeProto]) -> Any:
    """The float32 value of ``name`` if it is a constant, or a CastLike of one to float32 (how torch.export casts
    parameters to the activation's type), else None."""
    n = producer.get(name)
    if n is not None and n.op_type == "CastLike":
        name = n.input[0]
    value = _constant(graph, name)
    return value if value is not None and value.dtype == np.float32 else None


def affine_as_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """A group norm's per-channel affine (InstanceNormalization -> Reshape -> Mul(weight) -> Add(bias), how torch
    exports ``group_norm``) as one BatchNormalization node with mean 0, variance 1 and epsilon 0: one pass over
    the activation instead of two, the same values (x * weight + bias, per channel)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers = _readers(g)
    done = []
    for mul in [n for n in g.node if n.op_type == "Mul"]:
        src = producer.get(mul.input[0])
        inorm = src and src.op_type == "Reshape" and producer.get(src.input[0])
        # the bias is cast like the product (a CastLike reads it for its type only)
        adds = [r for r in readers.get(mul.output[0], []) if not (r.op_type == "CastLike" and r.input[0] != mul.output[0])]
        add = adds[0] if len(adds) == 1 and adds[0].op_type == "Add" and adds[0].input[0] == mul.output[0] else None
        if not inorm or inorm.op_type != "InstanceNormalization" or add is None:
            continue
        weight = _float_constant(g, mul.input[1], producer)
        bias = _float_constant(g, add.input[1], producer)
        if weight is None or bias is None or weight.ndim != 3 or weight.shape[1:] != (1, 1) \
                or bias.shape != weight.shape:
            continue
        c = weight.shape[0]
        names = [f"{mul.name}/bn_{k}" for k in ("scale", "bias", "mean", "var")]
        for k, v in zip(names, (weight.reshape(c), bias.reshape(c), np.zeros(c, np.float32), np.ones(c, np.float32))):
            g.initializer.append(numpy_helper.from_array(v, k))
        bn = onnx.helper.make_node("BatchNormalization", [mul.input[0], *names], [add.output[0]], epsilon=0.0,
                                   name=f"{mul.name}/affine")
        done.append((mul, add, bn))
    for mul, add, bn in done:
        nodes = list(g.node)
        nodes[nodes.index(mul)] = bn
        nodes.remove(add)
        del g.node[:]
        g.node.extend(nodes)
    return model


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove the nodes (Constant, CastLike) and initializers that no node reads any more after the rewrites."""
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in ("Constant", "CastLike") and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)


def rewrite(model: onnx.ModelProto, values: list[dict[str, Any]]) -> None:
    """Every rewrite of a traced quantized graph, in place; ``values``: each time group's group-dependent
    initializers."""
    fold_pads(model)
    merge_equal_quantizers(model, values)
    signed_activation_grids(model, values)
    quantize_before_layout(model)
    affine_as_batchnorm(model)
    drop_unused(model)


def merge_equal_quantizers(model: onnx.ModelProto, values: list[dict[str, Any]]) -> None:
    """One QuantizeLinear per value and grid: nodes that quantize the same value with equal scale and zero point in
    every time group's graph (``values``: each group's group-dependent initializers) are merged into the first, in
    place. Quantizers that share a grid (quant.share_grids) hold it under their own names, which onnxruntime's own
    merging of equal nodes does not see through."""
    g = model.graph
    held = {t.name: t for t in g.initializer}

    def value_key(name: str) -> bytes | None:
        if name in values[0]:
            return b"".join(v[name].tobytes() for v in values)
        return numpy_helper.to_array(held[name]).tobytes() if name in held else None

    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    dead = []
    for n in g.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3:
            continue
        params = tuple(value_key(i) for i in n.input[1:])
        if any(p is None for p in params):
            continue
        key = (n.input[0], *params, *sorted(a.SerializeToString() for a in n.attribute))
        if key in first:
            renamed[n.output[0]] = first[key]
            dead.append(n)
        else:
            first[key] = n.output[0]
    for n in dead:
        g.node.remove(n)
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in renamed:
                n.input[i] = renamed[name]
    for o in g.output:
        if o.name in renamed:
            raise RuntimeError(f"ONNX export: graph output {o.name} is a merged quantizer's")
    _forget_shapes(g, set(renamed))


def signed_activation_grids(model: onnx.ModelProto, values: list[dict[str, Any]]) -> None:
    """Activation grids whose uint8 zero point is the middle code (128) in every time group's graph written as int8
    grids with zero point 0 (in place, in ``model`` and ``values``): the same values, since round(x / s) + 128 on
    [0, 255] less 128 is round(x / s) on [-128, 127], and no runtime has an offset to subtract (OpenVINO subtracts an
    activation's zero point in float before a FullyConnected). quant.act_symmetric puts every signed tensor there.
    Where a graph is opened in onnxruntime, :func:`unsigned_activation_grids` turns them back."""
    held = {t.name: t for t in model.graph.initializer}

    def middle(name: str) -> bool:
        per_group = [v[name] for v in values] if name in values[0] else [numpy_helper.to_array(held[name])]
        return all(a.dtype == np.uint8 and int(a.reshape(-1)[0]) == 128 for a in per_group)

    signed = {z for z in activation_zero_points(model.graph, onnx.TensorProto.UINT8) if middle(z)}
    zero = np.zeros((), np.int8)
    _retype(model.graph, {z: zero for z in signed})
    for v in values:
        v.update({z: np.zeros(v[z].shape, np.int8) for z in signed if z in v})


def activation_zero_points(graph: onnx.GraphProto, data_type: int) -> set[str]:
    """The scalar ``data_type`` zero-point initializers that only activation QuantizeLinear/DequantizeLinear pairs
    read (never a weight's DequantizeLinear, whose codes are an initializer): a rewrite changes all their readers."""
    held = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    out = set()
    for n in graph.node:
        z = n.input[2] if n.op_type == "QuantizeLinear" and len(n.input) > 2 else None
        t = held.get(z)
        if t is None or t.data_type != data_type or numpy_helper.to_array(t).size != 1:
            continue
        if all(r.op_type in ("QuantizeLinear", "DequantizeLinear") and list(r.input).index(z) == 2
               and r.input[0] not in held for r in readers[z]):
            out.add(z)
    return out


def zero_int8_grids(graph: onnx.GraphProto) -> set[str]:
    """The int8 activation zero points that are 0: the grids :func:`signed_activation_grids` wrote."""
    held = {t.name: t for t in graph.initializer}
    return {z for z in activation_zero_points(graph, onnx.TensorProto.INT8)
            if int(numpy_helper.to_array(held[z]).reshape(-1)[0]) == 0}


def unsigned_activation_grids(model: onnx.ModelProto) -> int:
    """The inverse of :func:`signed_activation_grids`, in place: every int8 activation grid with zero point 0 as uint8
    with zero point 128, the same values (other int8 grids are left as they are). onnxruntime's x86 integer kernels
    read uint8 activations: its QDQ fusions leave int8 ones in float on CPUs without VNNI. Returns how many zero
    points it changed."""
    zps = zero_int8_grids(model.graph)
    _retype(model.graph, {z: np.full((), 128, np.uint8) for z in zps})
    return len(zps)


def _retype(graph: onnx.GraphProto, zero_points: dict[str, np.ndarray]) -> None:
    """Give each named zero-point initializer its new value (and type), keeping its shape, and drop the recorded
    shapes of the QuantizeLinear outputs that change type with it."""
    for t in graph.initializer:
        if t.name in zero_points:
            shape = numpy_helper.to_array(t).shape
            t.CopyFrom(numpy_helper.from_array(np.broadcast_to(zero_points[t.name], shape).copy(), t.name))
    _forget_shapes(graph, {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
                           and n.input[2] in zero_points})
