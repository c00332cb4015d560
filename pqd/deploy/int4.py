"""4-bit weights stored as 4 bits in the deployed graphs, and widened to int8 where a runtime loads them.

A W4 export's weight codes lie on the 4-bit grid. :func:`pack_int4` stores every DequantizeLinear code initializer
whose values fit in [-8, 7] as an ONNX INT4 tensor (two codes a byte, opset 21), so the artifact is 4-bit on disk; an
8-bit code tensor that happens to fit is stored exactly as well, since the values are the same.

Neither onnxruntime nor OpenVINO has a 4-bit convolution kernel, and onnxruntime fuses a DequantizeLinear into an
integer kernel only from int8: an INT4 weight left as it is would run as a float layer (the kernel audit would name
it). So where a graph is opened (:func:`runnable_graph`), its INT4 initializers are widened to INT8 in memory, exactly,
and the layers run on the same int8 kernels as a W8 export's. The same place gives onnxruntime its activations on
uint8 grids (quant.act_symmetric's signed ones turned back, exactly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from pqd.deploy.rewrite import unsigned_activation_grids, zero_int8_grids

INT4_OPSET = 21  # DequantizeLinear takes INT4 from opset 21 on
_LOW, _HIGH = -8, 7


def _pack(codes: np.ndarray) -> bytes:
    """ONNX INT4 layout: element 2i in the low nibble of byte i, element 2i+1 in the high one (an odd count is
    padded with a zero nibble)."""
    flat = codes.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    low, high = flat[0::2].astype(np.uint8) & 0x0F, flat[1::2].astype(np.uint8) & 0x0F
    return (low | (high << 4)).astype(np.uint8).tobytes()


def _int4(name: str, values: np.ndarray) -> onnx.TensorProto:
    return onnx.helper.make_tensor(name, TensorProto.INT4, list(values.shape), _pack(values), raw=True)


def _fits(values: np.ndarray) -> bool:
    return values.size == 0 or (values.min() >= _LOW and values.max() <= _HIGH)


def pack_int4(model: onnx.ModelProto) -> int:
    """Store in place every int8 DequantizeLinear code initializer of ``model`` that fits in 4 bits (with its zero
    points) as INT4, and raise the default opset to 21 where one was; returns how many code tensors were packed."""
    inits = {t.name: t for t in model.graph.initializer}
    dqs: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            dqs.setdefault(n.input[0], []).append(n)

    def int8(name: str) -> np.ndarray | None:
        t = inits.get(name)
        return numpy_helper.to_array(t) if t is not None and t.data_type == TensorProto.INT8 else None

    packed, zero_points = 0, {}
    for code, nodes in dqs.items():
        values = int8(code)
        zps = [n.input[2] for n in nodes if len(n.input) > 2 and n.input[2]]
        if values is None or not _fits(values) or any(int8(z) is None or not _fits(int8(z)) for z in zps):
            continue
        inits[code].CopyFrom(_int4(code, values))
        for n in nodes:  # the zero point takes the code's type: a 4-bit copy (an int8 one may be shared)
            if len(n.input) > 2 and n.input[2]:
                z = n.input[2]
                if z not in zero_points:
                    zero_points[z] = f"{z}.int4"
                    model.graph.initializer.append(_int4(zero_points[z], int8(z)))
                n.input[2] = zero_points[z]
        packed += 1
    used = {i for n in model.graph.node for i in n.input}
    for name in zero_points:
        if name not in used:
            model.graph.initializer.remove(inits[name])
    if packed:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, INT4_OPSET)
    return packed


def load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read every initializer's external data (location, offset, length) from the files under ``base_dir`` into the
    tensor, in place. onnx's own loader (1.23) refuses a data file with more than one hard link, and DVC checks an
    export out of its cache as hard links (``cache.type`` reflink,hardlink,copy, as the sweep runner's clones use);
    the files of an export are verified against its manifest's hashes before a graph is opened, so a link is not a
    way in. A location outside ``base_dir`` is refused."""
    base = Path(base_dir).resolve()
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        file = (base / info["location"]).resolve()
        if not file.is_relative_to(base):
            raise ValueError(f"initializer {t.name}: external data location {info['location']!r} is outside {base}")
        with open(file, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(int(info["length"])) if "length" in info else f.read()
        t.raw_data = data
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


def _widen(model: onnx.ModelProto) -> bytes:
    """``model`` (its external data loaded) with every INT4 initializer widened to INT8, the same values, serialized."""
    for t in model.graph.initializer:
        if t.data_type == TensorProto.INT4:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int8), t.name))
    return model.SerializeToString()


def widened(path: Path) -> bytes:
    """The graph at ``path`` with its external data loaded and every INT4 initializer widened to INT8 (the same
    values), serialized: what a runtime compiles from memory."""
    model = onnx.load(str(path), load_external_data=False)
    load_external_data(model, Path(path).parent)
    return _widen(model)


def runnable_graph(path: Path, unsigned_activations: bool = False) -> str | bytes:
    """What a runtime should load for the graph at ``path``: the path itself, or the widened graph's bytes when it
    holds 4-bit weights (the graph file is read once; weights.bin only then). ``unsigned_activations`` (onnxruntime):
    its int8 activation grids as uint8 ones too (:func:`pqd.deploy.rewrite.unsigned_activation_grids`, exact)."""
    model = onnx.load(str(path), load_external_data=False)
    int4 = any(t.data_type == TensorProto.INT4 for t in model.graph.initializer)
    signed = unsigned_activations and bool(zero_int8_grids(model.graph))
    if not int4 and not signed:
        return str(path)
    load_external_data(model, Path(path).parent)
    if signed:
        unsigned_activation_grids(model)
    return _widen(model)
