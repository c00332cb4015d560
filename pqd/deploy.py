"""The deployable artifact: ONNX graphs of the quantized UNet that onnxruntime runs with integer kernels.

Every quantized layer is traced as QuantizeLinear/DequantizeLinear around a float Conv/MatMul/Gemm
(see pqd.core.onnx_qdq): the weights are int8 initializers (4-bit weights are int8 values on the
4-bit grid) and every activation scale is a constant, which is what lets onnxruntime fuse the pattern
into QLinearConv / QLinearMatMul / QGemm. Time-aware activation parameters are kept exactly: one graph
per time group (``onnx/unet.g<g>.onnx``, small: graph and scales only), all reading the initializers
they share (weights, biases, norms) from one file, ``onnx/weights.bin``.

:class:`OrtDenoiser` samples with those graphs (the session of each timestep's group), so the evaluate
stage measures the FID of what ships.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from pqd.core import TimeGroups, set_time_group
from pqd.core.modules import set_onnx_mode
from pqd.diffusion.adapter import Denoiser
from pqd.io import read_json

ONNX_DIR = "onnx"
WEIGHTS_FILE = "weights.bin"
OPSET = 17
_ALIGN = 64
_INLINE_MAX = 64  # initializers smaller than this (scalars, per-group constants) stay in the graph
# onnxruntime kernels that compute in integer arithmetic, and the float ones a quantized layer may fall back to
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QAttention")
FLOAT_KERNELS = ("Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")


def graph_file(group: int) -> str:
    return f"unet.g{group}.onnx"


class _Forward(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample


def export_unet(unet: nn.Module, sample_shape: tuple[int, ...]) -> bytes:
    """``unet`` (float or quantized, as it is set) as ONNX bytes: inputs ``sample`` [B, C, H, W] and ``timestep``
    [B], output ``noise``, dynamic batch."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape asserts and our constant scales
        torch.onnx.export(_Forward(unet).eval(), (torch.zeros(2, *sample_shape), torch.full((2,), 10.0)), buf,
                          dynamo=False, opset_version=OPSET, input_names=["sample", "timestep"], output_names=["noise"],
                          dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"}, "noise": {0: "batch"}})
    return buf.getvalue()


def trace_group(unet: nn.Module, group: int, sample_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The ONNX graph of the quantized ``unet`` with the activation parameters of time group ``group``."""
    set_time_group(unet, group)
    set_onnx_mode(unet, True)
    try:
        return onnx.load_from_string(export_unet(unet, sample_shape))
    finally:
        set_onnx_mode(unet, False)
        set_time_group(unet, 0)


def _tensor_bytes(t: onnx.TensorProto) -> bytes:
    return numpy_helper.to_array(t).tobytes()


def _externalize(t: onnx.TensorProto, offset: int, length: int) -> None:
    """Point initializer ``t`` at bytes [offset, offset + length) of the shared weights file."""
    name, dtype, dims = t.name, t.data_type, list(t.dims)
    t.Clear()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
        t.external_data.add(key=key, value=str(value))
    t.data_location = onnx.TensorProto.EXTERNAL


def write_onnx(unet: nn.Module, groups: TimeGroups, sample_shape: tuple[int, ...], folder: Path) -> dict[str, Any]:
    """Write one graph per time group into ``folder``; every initializer of at least ``_INLINE_MAX`` bytes goes
    to weights.bin, stored once by content (the groups' graphs share weights, biases and norms, whatever
    names the tracer gave the tensors it folded)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = [trace_group(unet, g, sample_shape) for g in range(groups.count)]
    blobs: dict[bytes, tuple[int, int]] = {}
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for m in models:
            for t in m.graph.initializer:
                data = _tensor_bytes(t)
                if len(data) < _INLINE_MAX:
                    continue
                key = hashlib.sha256(data).digest() + bytes([t.data_type])
                if key not in blobs:
                    pad = -f.tell() % _ALIGN
                    f.write(b"\0" * pad)
                    blobs[key] = (f.tell(), len(data))
                    f.write(data)
                _externalize(t, *blobs[key])
    for g, m in enumerate(models):
        m.producer_name = "pqd"
        m.doc_string = f"PQD quantized UNet, time group {g} of {groups.count}"
        onnx.save(m, folder / graph_file(g))
    int8 = [t for t in models[0].graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return {"onnx_graphs": groups.count, "onnx_int8_initializers": len(int8),
            "onnx_shared_bytes": (folder / WEIGHTS_FILE).stat().st_size,
            "onnx_graph_bytes": sum((folder / graph_file(g)).stat().st_size for g in range(groups.count))}


def session_options(threads: int | None = None, optimized_path: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def open_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def kernel_report(path: Path) -> dict[str, Any]:
    """Which kernels onnxruntime actually runs for the graph at ``path``, read from its optimised graph."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(str(path), session_options(optimized_path=opt), providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node)
    return {"int8": {k: v for k, v in sorted(ops.items()) if k in INT8_KERNELS},
            "float": {k: v for k, v in sorted(ops.items()) if k in FLOAT_KERNELS}}


class OrtDenoiser(Denoiser):
    """A :class:`Denoiser` whose UNet is the deployed ONNX artifact, run by onnxruntime."""

    def __init__(self, onnx_dir: Path, scheduler_config: dict[str, Any], scheduler_class: str,
                 sample_shape: tuple[int, int, int], time_groups: TimeGroups, threads: int | None = None) -> None:
        super().__init__(unet=None, scheduler_config=scheduler_config, scheduler_class=scheduler_class,
                         sample_shape=sample_shape, time_groups=time_groups)
        self.onnx_dir = Path(onnx_dir)
        # every graph is loaded now: the folder may be temporary (a downloaded release)
        self._sessions = [open_session(self.onnx_dir / graph_file(g), threads) for g in range(time_groups.count)]

    def session(self, group: int):
        return self._sessions[group]

    def run_group(self, x: torch.Tensor, t: torch.Tensor, group: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            raise ValueError("the deployed ONNX graphs take no encoder hidden states: text-guided models are "
                             "evaluated with evaluate.backend = 'torch'")
        tb = t.expand(x.shape[0]) if t.ndim == 0 else t
        feeds = {"sample": x.detach().to(torch.float32).cpu().contiguous().numpy(),
                 "timestep": tb.detach().to(torch.float32).cpu().contiguous().numpy()}
        (y,) = self.session(group).run(None, feeds)
        return torch.from_numpy(np.ascontiguousarray(y)).to(x.device)


def load_ort_denoiser(export_dir: Path, threads: int | None = None, components: Denoiser | None = None) -> OrtDenoiser:
    """The deployed denoiser of an export folder (verify its manifest first: see pqd.artifact).
    ``components``: a Denoiser of the same export whose float parts around the UNet (a latent model's
    decoder) the deployed one uses too."""
    from pqd.artifact import time_groups_of

    export_dir = Path(export_dir)
    onnx_dir = export_dir / ONNX_DIR
    groups = time_groups_of(export_dir)
    missing = [graph_file(g) for g in range(groups.count) if not (onnx_dir / graph_file(g)).is_file()]
    if missing:
        raise FileNotFoundError(f"{onnx_dir}/{missing[0]} is missing: the export has no ONNX graph for every "
                                f"time group (set export.onnx = true and rerun the export stage)")
    index = read_json(export_dir / "model_index.json")
    cfg = read_json(export_dir / "unet" / "config.json")
    size = cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    den = OrtDenoiser(onnx_dir, read_json(export_dir / "scheduler" / "scheduler_config.json"), index["scheduler"][1],
                      (int(cfg["in_channels"]), int(h), int(w)), groups, threads)
    if components is not None:
        den.decoder, den.latent_scale = components.decoder, components.latent_scale
    return den
