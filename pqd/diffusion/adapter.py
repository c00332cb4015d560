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

# layers kept at a higher weight precision by default: the first and last convolutions and the
# time-embedding MLP (small, and errors there reach every block)
EDGE_LAYER_PREFIXES = ("conv_in", "conv_out", "time_embedding.")


class ModelFolderError(ValueError):
    """A model folder that is not a usable diffusers pipeline."""


@dataclass
class Denoiser:
    unet: nn.Module
    scheduler_config: dict[str, Any]
    scheduler_class: str
    sample_shape: tuple[int, int, int]  # (C, H, W) of the UNet's input

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """UNet output (noise prediction) for inputs x [B, C, H, W] at timesteps t (scalar or [B])."""
        return self.unet(x, t).sample

    @staticmethod
    def to_images(x: torch.Tensor) -> torch.Tensor:
        """Samples in model space [-1, 1] -> images [B, C, H, W] in [0, 1]."""
        return ((x.float() + 1) / 2).clamp(0, 1)

    def edge_layers(self, names: list[str]) -> list[str]:
        return [n for n in names if n == "conv_in" or n == "conv_out" or n.startswith(EDGE_LAYER_PREFIXES)]


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
