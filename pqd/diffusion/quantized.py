"""The export folder (:mod:`pqd.formats.export`) loaded back: the quantized denoiser network, a Denoiser around it,
and the export as a diffusers pipeline that picks the time group from the timestep.

Every loader verifies the folder against its manifest first (``load_quantized_net(..., verify=False)`` skips
it for a folder being written), so nothing unverified is loaded from an export folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pqd.core.quantize import MatMulQParams, SiteQParams, apply_qstate, weight_layers
from pqd.core.timegroups import set_time_group, TimeGroups
from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.diffusion.attention import use_matmul_attention
from pqd.diffusion.glue import install_sites
from pqd.diffusion.pipeline import denoiser_from_config
from pqd.diffusion.pipeline import load_pipeline as load_pipeline_folder
from pqd.errors import ArtifactError
from pqd.formats import qstate as qcodec
from pqd.formats.export import QUANTIZED, time_groups_of, verify_manifest
from pqd.formats.files import read_json
from pqd.formats.pipefolder import denoiser_component


def load_quantized_net(export_dir: str | Path, device: str = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild the quantized denoiser from an export folder alone (float32 compute, integer weights); select its
    time group with ``set_time_group``, or sample through :func:`load_denoiser_from_export`, which does it."""
    export_dir = Path(export_dir)
    if verify:
        verify_manifest(export_dir)
    component = denoiser_component(export_dir)
    weights = f"{component}/{QUANTIZED}"
    state, _, floats, _ = qcodec.read(export_dir, weights)
    net = denoiser_from_config(read_json(export_dir / component / "config.json"))
    missing, unexpected = net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                                for k, v in floats.items()}, strict=False)
    expected_missing = {f"{n}.weight" for n in weight_layers(state)}
    if unexpected or set(missing) != expected_missing:
        extra = sorted(set(missing) - expected_missing)[:1] or sorted(unexpected)[:1]
        raise ArtifactError(f"{export_dir}/{weights}: tensors do not match the {component} config (first mismatch: "
                            f"{extra})")
    if any(isinstance(lp, MatMulQParams) for lp in state.values()):  # quantized attention matmuls
        use_matmul_attention(net)
    install_sites(net, [n for n, lp in state.items() if isinstance(lp, SiteQParams)])  # quant.glue
    apply_qstate(net, state)
    return net.to(device).eval().requires_grad_(False)


def load_denoiser_from_export(export_dir: str | Path, device: str = "cpu") -> Denoiser:
    """A Denoiser around the quantized network, with every other pipeline component (scheduler config, and the
    float autoencoder / text encoders of latent and text models) loaded from the export folder."""
    export_dir = Path(export_dir)
    den = load_denoiser(export_dir, device, net=load_quantized_net(export_dir, device))
    den.time_groups = time_groups_of(export_dir)
    return den


def select_group_by_timestep(net: nn.Module, groups: TimeGroups) -> None:
    """Make ``net(sample, timestep, ...)`` pick the time group's activation parameters from the timestep itself,
    so code that knows nothing about time groups (a diffusers pipeline's ``__call__``) samples correctly."""
    if groups.count == 1:
        return

    def pick(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        present = groups.group_of(torch.as_tensor(t).detach().float().cpu()).unique()
        if len(present) != 1:
            raise ValueError(f"a batch with timesteps from {len(present)} time groups: call the UNet once per group "
                             "(pqd's Denoiser.predict splits such batches)")
        set_time_group(module, int(present[0]))

    net.register_forward_pre_hook(pick, with_kwargs=True)


def load_pipeline(export_dir: str | Path, device: str = "cpu"):
    """The export as a diffusers ``DiffusionPipeline`` whose denoiser (UNet or transformer) is the quantized one: ``pipe(...)``
    samples with the calibrated integer weights and time-aware activation parameters. Every file is verified
    first. (A pixel-space DiT pipeline, like the DiT demo's, has no autoencoder: its own ``__call__`` cannot
    decode; sample it with :class:`pqd.ops.serving.Sampler`.) To sample with the deployed ONNX graphs instead:
    :func:`pqd.deploy.runtime.load_pipeline` (``pqd.api.load_pipeline(..., runtime=...)``)."""
    export_dir = Path(export_dir)
    net = load_quantized_net(export_dir, device)
    select_group_by_timestep(net, time_groups_of(export_dir))
    return load_pipeline_folder(export_dir, device, net)
