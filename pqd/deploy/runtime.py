"""Running the deployed graphs in the runtime a user picks (onnxruntime or OpenVINO, both reading the same QDQ ONNX
files), the kernel audit of each, and a Denoiser on them (:class:`DeployedDenoiser`, so that the evaluate stage
measures the FID of what ships)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from diffusers.utils import BaseOutput

from pqd.core.timegroups import TimeGroups
from pqd.deploy import openvino, ort
from pqd.deploy.kernels import KernelAudit, quantized_layers
from pqd.deploy.onnx import ONNX_DIR, graph_file
from pqd.diffusion import quantized
from pqd.diffusion.adapter import Denoiser
from pqd.diffusion.pipeline import denoiser_component, sample_shape_of
from pqd.diffusion.pipeline import load_pipeline as load_pipeline_folder
from pqd.errors import MissingInputError, ParamError
from pqd.formats.export import time_groups_of
from pqd.formats.files import read_json

RUNTIMES = ("onnxruntime", "openvino")


def check_runtime(runtime: str, torch_too: bool = False) -> str:
    """``runtime`` when it names a runtime of the deployed graphs (or, with ``torch_too``, torch: the simulated
    model), else a one-line ParamError listing the allowed names."""
    allowed = ("torch", *RUNTIMES) if torch_too else RUNTIMES
    if runtime not in allowed:
        raise ParamError(f"runtime = {runtime!r} is not allowed: expected one of {', '.join(allowed)}")
    return runtime


def open_graph(path: Path, runtime: str = "onnxruntime", threads: int | None = None, spinning: bool = True):
    """A graph ready to run (``.run(feeds)`` gives its first output as a numpy array). ``spinning=False``:
    onnxruntime's threads sleep between calls (several graphs timed in turn in one process)."""
    if check_runtime(runtime) == "openvino":
        return openvino.OvGraph(path, threads)
    return ort.OrtGraph(path, threads, spinning)


def kernel_audit(path: Path, runtime: str = "onnxruntime", threads: int | None = None) -> KernelAudit:
    """Which kernels ``runtime`` runs for the graph at ``path``, and which quantized layers it runs in float."""
    layers, by_design, weight_only = quantized_layers(path)
    if check_runtime(runtime) == "openvino":
        return openvino.kernel_audit(path, layers, by_design, weight_only, threads)
    return ort.kernel_audit(path, layers, by_design, weight_only)


def kernel_report(path: Path, runtime: str = "onnxruntime") -> dict[str, Any]:
    """The audit as the export metrics record it (``onnx_kernels[runtime]``)."""
    return kernel_audit(path, runtime).as_dict()


def graph_feeds(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None
                ) -> dict[str, np.ndarray]:
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


class DeployedDenoiser(Denoiser):
    """A :class:`Denoiser` whose network is the deployed ONNX artifact, run by onnxruntime or OpenVINO. Its graphs
    take the conditioning inputs by name, as the torch network does (see pqd.deploy.onnx)."""

    def __init__(self, onnx_dir: Path, scheduler_config: dict[str, Any], scheduler_class: str,
                 sample_shape: tuple[int, int, int], time_groups: TimeGroups, threads: int | None = None,
                 components: Denoiser | None = None, runtime: str = "onnxruntime") -> None:
        """``components``: a Denoiser of the same export whose float parts around the network (decoder and latent
        scaling, encoder, architecture) this one uses too; without it, those of a plain pixel UNet."""
        parts = {} if components is None else {
            "decoder": components.decoder, "latent_scale": components.latent_scale,
            "latent_shift": components.latent_shift, "encoder": components.encoder, "arch": components.arch}
        super().__init__(net=None, scheduler_config=scheduler_config, scheduler_class=scheduler_class,
                         sample_shape=sample_shape, time_groups=time_groups, **parts)
        self.onnx_dir, self.runtime = Path(onnx_dir), check_runtime(runtime)
        # every graph is loaded now: the folder may be temporary (a downloaded release)
        self._graphs = [open_graph(self.onnx_dir / graph_file(g), runtime, threads) for g in range(time_groups.count)]

    @property
    def inputs(self) -> tuple[str, ...]:
        """The graphs' input names: sample, timestep, then the conditioning inputs."""
        return self._graphs[0].inputs

    def run_group(self, x: torch.Tensor, t: torch.Tensor, group: int, cond: dict[str, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        y = self._graphs[group].run(graph_feeds(x, t, cond))
        return torch.from_numpy(np.ascontiguousarray(y)).to(x.device)


def load_deployed_denoiser(export_dir: Path, runtime: str = "onnxruntime", threads: int | None = None,
                           components: Denoiser | None = None) -> DeployedDenoiser:
    """The deployed denoiser of an export folder in ``runtime`` (verify its manifest first: see
    pqd.formats.export). ``components``: a Denoiser of the same export whose float parts around the network (a
    latent model's decoder, a conditioned model's text encoders or classes) the deployed one uses too."""
    check_runtime(runtime)
    export_dir = Path(export_dir)
    onnx_dir = export_dir / ONNX_DIR
    groups = time_groups_of(export_dir)
    missing = [graph_file(g) for g in range(groups.count) if not (onnx_dir / graph_file(g)).is_file()]
    if missing:
        raise MissingInputError(f"{onnx_dir}/{missing[0]} is missing: the export has no ONNX graph for every "
                                f"time group (set export.onnx = true and rerun the export stage)")
    index = read_json(export_dir / "model_index.json")
    cfg = read_json(export_dir / denoiser_component(export_dir) / "config.json")
    return DeployedDenoiser(onnx_dir, read_json(export_dir / "scheduler" / "scheduler_config.json"),
                            index["scheduler"][1], sample_shape_of(cfg), groups, threads, components, runtime)


def load_pipeline(export_dir: str | Path, device: str = "cpu", runtime: str = "torch"):
    """The export as a diffusers ``DiffusionPipeline`` (every file verified first). ``runtime``: torch (the simulated
    integer arithmetic: :func:`pqd.diffusion.quantized.load_pipeline`), or onnxruntime / openvino: the denoiser's
    forward runs the export's deployed ONNX graphs in that runtime, on the CPU (a batch whose timesteps fall in
    several time groups is split by group)."""
    if check_runtime(runtime, torch_too=True) == "torch":
        return quantized.load_pipeline(export_dir, device)
    export_dir = Path(export_dir)
    net = quantized.load_quantized_net(export_dir, device)  # verifies the manifest
    run_deployed(net, load_deployed_denoiser(export_dir, runtime))
    return load_pipeline_folder(export_dir, device, net)


def run_deployed(net: nn.Module, deployed: DeployedDenoiser) -> None:
    """Make ``net(sample, timestep, **conditioning)`` run ``deployed`` (a DeployedDenoiser of the same export)
    instead of its torch layers; the module keeps its config, dtype and device, which a pipeline reads. The graphs
    give the noise prediction: a transformer with learned variance gets zeros in its variance channels (the DiT
    pipeline discards them)."""
    names = [n for n in deployed.inputs if n not in ("sample", "timestep")]
    channels = int(getattr(net.config, "out_channels", 0) or 0)

    def forward(sample: torch.Tensor, timestep=None, *args, return_dict: bool = True, **kwargs):
        t = kwargs.pop("timesteps", timestep if timestep is not None else (args[0] if args else None))
        missing = [n for n in names if kwargs.get(n) is None]
        if t is None or missing:
            raise ValueError(f"the deployed graphs take sample, timestep and {', '.join(names) or 'nothing else'}: "
                             f"missing {'timestep' if t is None else ', '.join(missing)}")
        y = deployed.predict(sample.float().cpu(), torch.as_tensor(t).float().cpu(), {n: kwargs[n] for n in names})
        if channels == 2 * y.shape[1]:
            y = torch.cat([y, torch.zeros_like(y)], dim=1)
        y = y.to(sample.device, sample.dtype)
        return BaseOutput(sample=y) if return_dict else (y,)

    net.forward = forward
