"""Architecture knowledge about diffusers models lives here (and only here).

A :class:`Denoiser` wraps the parts of a diffusers pipeline the product needs: the UNet that gets
quantized, the scheduler config it is sampled with, the shape of its samples and how samples become
images. Everything else in the product talks to a Denoiser, not to a pipeline class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.core import TimeGroups, set_time_group

# layers kept at a higher weight precision by default: the first and last convolutions and the
# time-embedding MLP (small, and errors there reach every block)
EDGE_LAYER_PREFIXES = ("conv_in", "conv_out", "time_embedding.")


class ModelFolderError(ValueError):
    """A model folder that is not a usable diffusers pipeline."""


# the units that block reconstruction optimises one at a time; any quantized layer outside them is a unit
# of its own. Named by class so every UNet built from diffusers' blocks is covered.
UNIT_CLASSES = ("ResnetBlock2D", "Attention", "Transformer2DModel", "Downsample2D", "Upsample2D")


@dataclass
class Denoiser:
    unet: nn.Module
    scheduler_config: dict[str, Any]
    scheduler_class: str
    sample_shape: tuple[int, int, int]  # (C, H, W) of the UNet's input
    time_groups: TimeGroups | None = None  # set for a quantized UNet with time-aware activations

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """UNet output (noise prediction) for inputs x [B, C, H, W] at timesteps t (scalar or [B]).

        With time groups, each sample runs with the activation parameters of its timestep's group
        (a batch that mixes groups is split by group)."""
        t = torch.as_tensor(t, device=x.device)
        if self.time_groups is None or self.time_groups.count == 1:
            return self.run_group(x, t, 0)
        tb = t.expand(x.shape[0]) if t.ndim == 0 else t
        groups = self.time_groups.group_of(tb.cpu())
        present = groups.unique().tolist()
        if len(present) == 1:
            return self.run_group(x, t, present[0])
        out = None
        for g in present:
            idx = (groups == g).nonzero().squeeze(1).to(x.device)
            y = self.run_group(x[idx], tb[idx], g)
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out[idx] = y
        return out

    def run_group(self, x: torch.Tensor, t: torch.Tensor, group: int) -> torch.Tensor:
        """The UNet on a batch whose timesteps all lie in time group ``group``."""
        if self.time_groups is not None and self.time_groups.count > 1:
            set_time_group(self.unet, group)
        return self.unet(x, t).sample

    @staticmethod
    def to_images(x: torch.Tensor) -> torch.Tensor:
        """Samples in model space [-1, 1] -> images [B, C, H, W] in [0, 1]."""
        return ((x.float() + 1) / 2).clamp(0, 1)

    def edge_layers(self, names: list[str]) -> list[str]:
        return [n for n in names if n == "conv_in" or n == "conv_out" or n.startswith(EDGE_LAYER_PREFIXES)]

    def float_output_layers(self, names: list[str]) -> list[str]:
        """Layers whose output stays in float when outputs are quantized: the last convolution (the
        noise prediction itself; an 8-bit grid there would cap the precision of every step)."""
        return [n for n in names if n == "conv_out"]

    def units(self, layer_names: list[str]) -> list[str]:
        """Reconstruction units (module order; the reconstruction orders them by a forward pass): block
        modules (UNIT_CLASSES) containing quantized layers, outermost first, and each remaining layer
        (conv_in, time embedding, conv_out) alone."""
        units: list[str] = []
        for name, m in self.unet.named_modules():
            if type(m).__name__ in UNIT_CLASSES and not any(name.startswith(u + ".") for u in units):
                if any(n.startswith(name + ".") for n in layer_names):
                    units.append(name)
        covered = [n for n in layer_names if any(n.startswith(u + ".") for u in units)]
        return units + [n for n in layer_names if n not in covered]

    def skip_splits(self) -> dict[str, int]:
        """Layers whose input is a skip concatenation [h, skip] in the up path, and the channel count of h
        (for shortcut splitting): the up blocks' ResNet first convolution and 1x1 shortcut."""
        unet = self.unet
        prev = unet.mid_block.resnets[-1].out_channels if unet.mid_block is not None else unet.up_blocks[0].resnets[0].out_channels
        splits: dict[str, int] = {}
        for i, block in enumerate(unet.up_blocks):
            for j, r in enumerate(block.resnets):
                k = prev if j == 0 else block.resnets[j - 1].out_channels
                if r.in_channels > k:
                    splits[f"up_blocks.{i}.resnets.{j}.conv1"] = k
                    if getattr(r, "conv_shortcut", None) is not None:
                        splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = k
            prev = block.resnets[-1].out_channels
        return splits


def unet_sample_shape(unet: nn.Module) -> tuple[int, int, int]:
    cfg = unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg.in_channels), int(h), int(w))


def check_pipeline_folder(folder: str | Path) -> Path:
    """Raise ModelFolderError unless ``folder`` looks like a diffusers pipeline (model_index.json + unet/)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist: expected a diffusers pipeline folder")
    if not (folder / "model_index.json").is_file():
        raise ModelFolderError(
            f"model folder {folder} is not a diffusers pipeline: model_index.json is missing "
            "(expected the save_pretrained layout)")
    if not (folder / "unet" / "config.json").is_file():
        raise ModelFolderError(f"model folder {folder} has no unet/config.json: only UNet pipelines are supported")
    return folder


def load_pipeline(folder: str | Path, device: str = "cpu"):
    """Load a diffusers pipeline from a local folder (float32, eval mode)."""
    from diffusers import DiffusionPipeline

    folder = check_pipeline_folder(folder)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"model folder {folder} could not be loaded as a diffusers pipeline: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return pipe.to(device)


def denoiser_from_pipeline(pipe) -> Denoiser:
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ModelFolderError(f"pipeline {type(pipe).__name__} has no unet: only UNet pipelines are supported")
    if type(unet).__name__ != "UNet2DModel":
        raise ModelFolderError(f"UNet class {type(unet).__name__} is not supported yet: expected UNet2DModel")
    unet.eval().requires_grad_(False)
    return Denoiser(unet=unet, scheduler_config=dict(pipe.scheduler.config),
                    scheduler_class=type(pipe.scheduler).__name__, sample_shape=unet_sample_shape(unet))


def load_denoiser(folder: str | Path, device: str = "cpu") -> Denoiser:
    return denoiser_from_pipeline(load_pipeline(folder, device))


def unet_from_config(config: dict[str, Any]) -> nn.Module:
    """A freshly initialised UNet of the class named in a saved config (weights loaded by the caller)."""
    import diffusers

    name = config.get("_class_name")
    if name != "UNet2DModel":
        raise ModelFolderError(f"UNet class {name!r} is not supported yet: expected 'UNet2DModel'")
    return getattr(diffusers, name).from_config(config)
