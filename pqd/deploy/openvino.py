"""OpenVINO: the export's QDQ ONNX graphs compiled by OpenVINO's CPU plugin (oneDNN kernels: VNNI, AMX-INT8 and
AMX-BF16 where the CPU has them), and the kernels it compiled them to. Nothing is converted by hand: OpenVINO reads
the same ONNX files as onnxruntime."""

from __future__ import annotations

import functools
import io
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov

from pqd.deploy.int4 import runnable_graph
from pqd.deploy.kernels import KernelAudit

LAYER_TYPES = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm")
INTEGER_PRECISIONS = ("i8", "u8", "i4", "u4")
PRECISIONS = ("f32", "bf16")  # OpenVINO's inference precision for what is not quantized


@functools.cache
def core() -> ov.Core:
    return ov.Core()


def cpu_supports_bf16() -> bool:
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_graph(path: Path, threads: int | None = None, precision: str = "f32", profile: bool = False):
    """The graph compiled for the CPU at one latency stream; ``precision`` is that of the float ops (f32 keeps the
    deployed numerics those of onnxruntime and the simulation; the quantized layers run in int8 either way);
    ``profile``: with OpenVINO's performance counters. An ONNX graph with 4-bit weights is widened first
    (pqd.deploy.int4); an OpenVINO IR (.xml) is read as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision {precision!r} is not allowed: expected one of {', '.join(PRECISIONS)}")
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": profile}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    graph = runnable_graph(path) if Path(path).suffix == ".onnx" else str(path)
    model = core().read_model(io.BytesIO(graph)) if isinstance(graph, bytes) else graph
    return core().compile_model(model, "CPU", config)


class OvGraph:
    """One graph compiled by OpenVINO; ``run`` gives its first output (a copy: the request reuses its buffers)."""

    runtime = "openvino"

    def __init__(self, path: Path, threads: int | None = None, precision: str = "f32") -> None:
        self.compiled = compile_graph(path, threads, precision)
        self.request = self.compiled.create_infer_request()
        self._out = self.compiled.output(0)
        self.inputs = tuple(i.get_any_name() for i in self.compiled.inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(self.request.infer(feeds)[self._out], copy=True)


def _info(op, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def kernel_audit(path: Path, layers: tuple[str, ...], by_design: tuple[str, ...], weight_only: tuple[str, ...] = (),
                 threads: int | None = None) -> KernelAudit:
    """The kernels of the compiled graph at ``path`` (its runtime model: each op's layer type, runtime precision
    and the source nodes fused into it). A quantized layer fell back to float where the layer kernel that holds its
    source node runs at a float precision, or where no layer kernel holds it and no other call of the same module
    (a node of the same name scope) runs on an integer kernel."""
    runtime = compile_graph(path, threads).get_runtime_model()
    counts: dict[str, Counter] = {"int8": Counter(), "float": Counter()}
    held: dict[str, bool] = {}  # source node (or a part of it: 'name/WithoutBiases') -> on an integer kernel
    for op in runtime.get_ordered_ops():
        kind, precision = _info(op, "layerType"), _info(op, "runtimePrecision")
        if kind not in LAYER_TYPES:
            continue
        integer = precision in INTEGER_PRECISIONS
        counts["int8" if integer else "float"][f"{kind} {precision}"] += 1
        for name in _info(op, "originalLayersNames").split(","):
            held[name] = held.get(name, False) or integer
    def kernels(layer: str) -> list[bool]:
        return [ok for name, ok in held.items() if name == layer or name.startswith(layer + "/")]

    def integer(layer: str) -> bool:
        # a node that no kernel holds is a repeated call of a layer whose other call the runtime kept (common
        # subexpression elimination: a DiT's final norm calls block 0's embedding again on the same inputs); it
        # runs on that call's kernel. With no other call kept, nothing holds it: a fallback as before
        own = kernels(layer)
        if own:
            return any(own)
        module = layer.rpartition("/")[0]
        twins = [k for other in layers if other != layer and module and other.rpartition("/")[0] == module
                 for k in kernels(other)]
        return bool(twins) and all(twins)

    on_float = [name for name in layers if not integer(name)]
    return KernelAudit.of("openvino", layers, by_design, weight_only, on_float,
                          int8=dict(sorted(counts["int8"].items())), float_=dict(sorted(counts["float"].items())))
