"""Loading diffusers pipelines and telling whether the product supports them.

The light half of the adapter layer: what the model stage needs to snapshot and check a pipeline,
without the quantization core (the Denoiser that the later stages work with is :mod:`pqd.diffusion.adapter`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.errors import ModelFolderError

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
# pipeline attributes holding the autoencoder of a latent pipeline (LDMPipeline: vqvae; StableDiffusion: vae)
DECODER_ATTRS = ("vqvae", "vae")


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


def load_pipeline(folder: str | Path, device: str = "cpu", unet: nn.Module | None = None):
    """Load a diffusers pipeline from a local folder (float32, eval mode); ``unet`` replaces the folder's UNet
    (an export folder: the quantized UNet, with every other component loaded from the folder)."""
    from diffusers import DiffusionPipeline

    folder = check_pipeline_folder(folder)
    extra = {} if unet is None else {"unet": unet}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"model folder {folder} could not be loaded as a diffusers pipeline: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return pipe.to(device)


def check_supported(pipe: Any) -> None:
    """Raise ModelFolderError (one line) unless the pipeline is a pixel, latent or text-guided UNet pipeline."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ModelFolderError(f"pipeline {type(pipe).__name__} has no unet: only UNet pipelines are supported")
    if type(unet).__name__ not in UNET_CLASSES:
        raise ModelFolderError(f"UNet class {type(unet).__name__} is not supported: expected one of {', '.join(UNET_CLASSES)}")
    if type(unet).__name__ == "UNet2DConditionModel":
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ModelFolderError(f"pipeline {type(pipe).__name__}: its UNet2DConditionModel needs a text_encoder and a "
                                   "tokenizer component: expected a text-guided pipeline (Stable Diffusion 1.x style)")
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ModelFolderError(f"UNet2DConditionModel with addition_embed_type = {unet.config.addition_embed_type!r} "
                                   "(SDXL-style extra conditioning) is not supported: expected none")


def decoder_of(pipe: Any) -> nn.Module | None:
    """The autoencoder of a latent pipeline (None for a pixel pipeline)."""
    return next((getattr(pipe, a) for a in DECODER_ATTRS if getattr(pipe, a, None) is not None), None)


def unet_sample_shape(unet: nn.Module) -> tuple[int, int, int]:
    cfg = unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg.in_channels), int(h), int(w))


def unet_from_config(config: dict[str, Any]) -> nn.Module:
    """A freshly initialised UNet of the class named in a saved config (weights loaded by the caller)."""
    import diffusers

    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise ModelFolderError(f"UNet class {name!r} is not supported: expected one of {', '.join(UNET_CLASSES)}")
    return getattr(diffusers, name).from_config(config)
