"""Loading diffusers pipelines and telling whether the product supports them: the light half of the adapter layer,
what the model stage needs without the quantization core. Which component holds the denoiser is the folder
layout's (:mod:`pqd.formats.pipefolder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.errors import ModelFolderError
from pqd.formats.pipefolder import DENOISER_CLASSES, SUPPORTED, denoiser_component

# pipeline attributes holding the autoencoder of a latent pipeline (LDMPipeline: vqvae; StableDiffusion: vae)
DECODER_ATTRS = ("vqvae", "vae")
# the text encoders (and their tokenizers) each text-conditioned denoiser class needs in its pipeline
TEXT_COMPONENTS: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": ("text_encoder", "tokenizer"),
    "PixArtTransformer2DModel": ("text_encoder", "tokenizer"),
    "SD3Transformer2DModel": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}


def check_pipeline_folder(folder: str | Path) -> Path:
    """Raise ModelFolderError unless ``folder`` looks like a diffusers pipeline (model_index.json + its
    denoiser's config: unet/ or transformer/)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist: expected a diffusers pipeline folder")
    if not (folder / "model_index.json").is_file():
        raise ModelFolderError(
            f"model folder {folder} is not a diffusers pipeline: model_index.json is missing "
            "(expected the save_pretrained layout)")
    component = denoiser_component(folder)
    if not (folder / component / "config.json").is_file():
        raise ModelFolderError(f"model folder {folder} has no {component}/config.json: expected the denoiser's config")
    return folder


def load_pipeline(folder: str | Path, device: str = "cpu", denoiser: nn.Module | None = None):
    """Load a diffusers pipeline from a local folder (float32, eval mode); ``denoiser`` replaces the folder's
    UNet or transformer (an export folder: the quantized one, every other component loaded from the folder).
    Components saved as null (a pixel-space DiT has no autoencoder) load as None."""
    from diffusers import DiffusionPipeline

    folder = check_pipeline_folder(folder)
    index = json.loads((folder / "model_index.json").read_text())
    extra: dict[str, Any] = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
    if denoiser is not None:
        extra[denoiser_component(folder)] = denoiser
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"model folder {folder} could not be loaded as a diffusers pipeline: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return pipe.to(device)


def denoiser_of(pipe: Any) -> tuple[str, nn.Module]:
    """(component name, module) of the pipeline's denoiser; ModelFolderError when it has none we support."""
    for component, classes in DENOISER_CLASSES.items():
        model = getattr(pipe, component, None)
        if model is None:
            continue
        if type(model).__name__ not in classes:
            raise ModelFolderError(f"{component} class {type(model).__name__} is not supported: expected one of "
                                   f"{', '.join(SUPPORTED)}")
        return component, model
    raise ModelFolderError(f"pipeline {type(pipe).__name__} has neither a unet nor a transformer: expected a "
                           f"pipeline whose denoiser is one of {', '.join(SUPPORTED)}")


def check_supported(pipe: Any) -> None:
    """Raise ModelFolderError (one line) unless the pipeline's denoiser is one the product supports, with the
    components it needs (the text encoders of a text-conditioned model)."""
    _, model = denoiser_of(pipe)
    name = type(model).__name__
    needed = TEXT_COMPONENTS.get(name, ())
    if missing := [c for c in needed if getattr(pipe, c, None) is None]:
        raise ModelFolderError(f"pipeline {type(pipe).__name__}: its {name} needs a {missing[0]} component: expected "
                               f"{', '.join(needed)} (a text-to-image pipeline)")
    if name == "UNet2DConditionModel" and getattr(model.config, "addition_embed_type", None) is not None:
        raise ModelFolderError(f"UNet2DConditionModel with addition_embed_type = {model.config.addition_embed_type!r} "
                               "(SDXL-style extra conditioning) is not supported: expected none")


def decoder_of(pipe: Any) -> nn.Module | None:
    """The autoencoder of a latent pipeline (None for a pixel pipeline)."""
    return next((getattr(pipe, a) for a in DECODER_ATTRS if getattr(pipe, a, None) is not None), None)


def sample_shape_of(config: Any) -> tuple[int, int, int]:
    """(C, H, W) of the denoiser's input, from its config (a dict or a diffusers FrozenDict)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    size = get("sample_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(get("in_channels")), int(h), int(w))


def denoiser_from_config(config: dict[str, Any]) -> nn.Module:
    """A freshly initialised denoiser of the class named in a saved config (weights loaded by the caller).
    Hub configs of DiT and PixArt name the legacy ``Transformer2DModel``, which diffusers remaps by norm type."""
    import diffusers

    name = config.get("_class_name")
    if name not in SUPPORTED and name != "Transformer2DModel":
        raise ModelFolderError(f"denoiser class {name!r} is not supported: expected one of {', '.join(SUPPORTED)}")
    model = getattr(diffusers, name).from_config(config)
    if type(model).__name__ not in SUPPORTED:
        raise ModelFolderError(f"denoiser class {type(model).__name__} is not supported: expected one of "
                               f"{', '.join(SUPPORTED)}")
    return model
