"""Running the deployed graphs: onnxruntime sessions, the kernels it really runs, and a Denoiser on them
(:class:`OrtDenoiser`, so that the evaluate stage measures the FID of what ships).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pqd.core.timegroups import TimeGroups
from pqd.deploy.onnx import ONNX_DIR, graph_file
from pqd.diffusion.adapter import Denoiser
from pqd.diffusion.pipeline import denoiser_component, sample_shape_of
from pqd.errors import MissingInputError
from pqd.formats.export import time_groups_of
from pqd.formats.files import read_json

# onnxruntime kernels that compute in integer arithmetic (layers, then glue between them: quant.glue), and the float
# ones a quantized layer may fall back to, then the float glue
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QAttention",
                "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat", "QLinearSoftmax")
FLOAT_KERNELS = ("Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm",
                 "Add", "Mul", "BatchNormalization", "Sigmoid", "QuickGelu", "Gelu", "FastGelu", "Concat", "Softmax")


def session_options(threads: int | None = None, optimized_path: Path | None = None, spinning: bool = True):
    """``spinning=False``: the session's worker threads sleep between calls instead of spinning (several sessions
    timed in turn in one process, where a spinning pool would take the cores from the next one)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def open_session(path: Path, threads: int | None = None, spinning: bool = True):
    return ort.InferenceSession(str(path), session_options(threads, spinning=spinning),
                                providers=["CPUExecutionProvider"])


def kernel_report(path: Path) -> dict[str, Any]:
    """Which kernels onnxruntime actually runs for the graph at ``path``, read from its optimised graph."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(str(path), session_options(optimized_path=opt), providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node)
    return {"int8": {k: v for k, v in sorted(ops.items()) if k in INT8_KERNELS},
            "float": {k: v for k, v in sorted(ops.items()) if k in FLOAT_KERNELS}}


def ort_feeds(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """The feeds of one call of a deployed (or float) graph: ``sample`` x [B, C, H, W] and ``timestep`` [B] (a scalar
    t expanded) as float32, and each conditioning input expanded to the batch, float ones as float32, integer ones
    (labels, masks) as int64."""
    t = torch.as_tensor(t)
    tb = t.expand(x.shape[0]) if t.ndim == 0 else t
    feeds = {"sample": x.detach().to(torch.float32).cpu().contiguous().numpy(),
             "timestep": tb.detach().to(torch.float32).cpu().contiguous().numpy()}
    for name, v in (cond or {}).items():
        v = v.detach().to(torch.float32 if v.is_floating_point() else torch.int64)
        feeds[name] = v.expand(x.shape[0], *v.shape[1:]).cpu().contiguous().numpy()
    return feeds


class OrtDenoiser(Denoiser):
    """A :class:`Denoiser` whose network is the deployed ONNX artifact, run by onnxruntime. Its graphs take the
    conditioning inputs by name, as the torch network does (see pqd.deploy.onnx)."""

    def __init__(self, onnx_dir: Path, scheduler_config: dict[str, Any], scheduler_class: str,
                 sample_shape: tuple[int, int, int], time_groups: TimeGroups, threads: int | None = None,
                 components: Denoiser | None = None) -> None:
        """``components``: a Denoiser of the same export whose float parts around the network (decoder and latent
        scaling, encoder, architecture) this one uses too; without it, those of a plain pixel UNet."""
        parts = {} if components is None else {
            "decoder": components.decoder, "latent_scale": components.latent_scale,
            "latent_shift": components.latent_shift, "encoder": components.encoder, "arch": components.arch}
        super().__init__(net=None, scheduler_config=scheduler_config, scheduler_class=scheduler_class,
                         sample_shape=sample_shape, time_groups=time_groups, **parts)
        self.onnx_dir = Path(onnx_dir)
        # every graph is loaded now: the folder may be temporary (a downloaded release)
        self._sessions = [open_session(self.onnx_dir / graph_file(g), threads) for g in range(time_groups.count)]

    def session(self, group: int):
        return self._sessions[group]

    def run_group(self, x: torch.Tensor, t: torch.Tensor, group: int, cond: dict[str, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        (y,) = self.session(group).run(None, ort_feeds(x, t, cond))
        return torch.from_numpy(np.ascontiguousarray(y)).to(x.device)


def load_ort_denoiser(export_dir: Path, threads: int | None = None, components: Denoiser | None = None) -> OrtDenoiser:
    """The deployed denoiser of an export folder (verify its manifest first: see pqd.formats.export).
    ``components``: a Denoiser of the same export whose float parts around the network (a latent model's
    decoder, a conditioned model's text encoders or classes) the deployed one uses too."""
    export_dir = Path(export_dir)
    onnx_dir = export_dir / ONNX_DIR
    groups = time_groups_of(export_dir)
    missing = [graph_file(g) for g in range(groups.count) if not (onnx_dir / graph_file(g)).is_file()]
    if missing:
        raise MissingInputError(f"{onnx_dir}/{missing[0]} is missing: the export has no ONNX graph for every "
                                f"time group (set export.onnx = true and rerun the export stage)")
    index = read_json(export_dir / "model_index.json")
    cfg = read_json(export_dir / denoiser_component(export_dir) / "config.json")
    return OrtDenoiser(onnx_dir, read_json(export_dir / "scheduler" / "scheduler_config.json"), index["scheduler"][1],
                       sample_shape_of(cfg), groups, threads, components)
