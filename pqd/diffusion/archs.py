"""What differs between the supported denoiser architectures: how each is called, and which of its layers are
special to quantization. One :class:`Architecture` per family of diffusers classes, found by class name.

Transformers' *modulation* layers (adaLN: the linears that regress shift, scale and gate from the conditioning)
have their own bit setting and keep their outputs in float: they feed elementwise products, and the matmul is
tiny ([B, D] x [D, 6D]). Every call returns the noise prediction only: DiT-XL/2 and PixArt learn the variance too
(twice the input channels); the sampler uses the first half, as diffusers' pipelines do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

Cond = dict[str, torch.Tensor]  # a batch's conditioning inputs by name, each [B, ...]


def _batch_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def _noise(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The noise prediction of an output that may carry a learned variance (2C channels for C input channels)."""
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


class Architecture:
    """The knowledge of one denoiser family (stateless: every method takes the model or layer names it needs)."""

    name = ""
    component = ""  # the pipeline component holding the denoiser
    classes: tuple[str, ...] = ()
    unit_classes: tuple[str, ...] = ()  # module classes that are reconstruction units
    guidance_scale = 1.0  # classifier-free guidance weight of the architecture's published protocol

    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        """One denoiser call: x [B, C, H, W], t scalar or [B], cond by name -> noise prediction [B, C, H, W]."""
        raise NotImplementedError

    def edge_layers(self, names: list[str]) -> list[str]:
        raise NotImplementedError

    def modulation_layers(self, names: list[str]) -> list[str]:
        return []

    def float_output_layers(self, names: list[str]) -> list[str]:
        raise NotImplementedError

    def skip_splits(self, model: nn.Module) -> dict[str, int]:
        return {}

    def units(self, model: nn.Module, layer_names: list[str]) -> list[str]:
        """Reconstruction units (module order; the reconstruction orders them by a forward pass): unit-class
        modules containing quantized layers, outermost first, and each remaining layer alone."""
        units: list[str] = []
        for name, m in model.named_modules():
            if type(m).__name__ in self.unit_classes and not any(name.startswith(u + ".") for u in units):
                if any(n.startswith(name + ".") for n in layer_names):
                    units.append(name)
        covered = [n for n in layer_names if any(n.startswith(u + ".") for u in units)]
        return units + [n for n in layer_names if n not in covered]

    def smooth_layers(self, model: nn.Module, names: list[str]) -> list[str]:
        """Linears whose input channels can trade range with their weights (SmoothQuant): the projections of
        attention modules and the linears of feed-forward modules, on token activations."""
        from diffusers.models.attention import FeedForward
        from diffusers.models.attention_processor import Attention

        special = set(self.edge_layers(names)) | set(self.modulation_layers(names))
        found = []
        for owner, m in model.named_modules():
            if isinstance(m, (Attention, FeedForward)):
                found += [f"{owner}.{n}" for n, c in m.named_modules() if isinstance(c, nn.Linear)]
        return [n for n in names if n in found and n not in special]


class UNetArch(Architecture):
    name, component = "unet", "unet"
    classes = ("UNet2DModel", "UNet2DConditionModel")
    unit_classes = ("ResnetBlock2D", "Attention", "Transformer2DModel", "Downsample2D", "Upsample2D")
    guidance_scale = 7.5  # Stable Diffusion 1.x (the pipeline's default and the SD papers' FID protocol)

    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        if cond is None:
            return model(x, t).sample
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def edge_layers(self, names: list[str]) -> list[str]:
        """The first and last convolutions and the time-embedding MLP (small, and errors there reach every block)."""
        return [n for n in names if n in ("conv_in", "conv_out") or n.startswith("time_embedding.")]

    def float_output_layers(self, names: list[str]) -> list[str]:
        """The last convolution: its output is the noise prediction (an 8-bit grid would cap every step's precision)."""
        return [n for n in names if n == "conv_out"]

    def skip_splits(self, model: nn.Module) -> dict[str, int]:
        """Layers whose input is a skip concatenation [h, skip] in the up path, and the channel count of h
        (for shortcut splitting): the up blocks' ResNet first convolution and 1x1 shortcut."""
        prev = model.mid_block.resnets[-1].out_channels if model.mid_block is not None \
            else model.up_blocks[0].resnets[0].out_channels
        splits: dict[str, int] = {}
        for i, block in enumerate(model.up_blocks):
            for j, r in enumerate(block.resnets):
                k = prev if j == 0 else block.resnets[j - 1].out_channels
                if r.in_channels > k:
                    splits[f"up_blocks.{i}.resnets.{j}.conv1"] = k
                    if getattr(r, "conv_shortcut", None) is not None:
                        splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = k
            prev = block.resnets[-1].out_channels
        return splits


# parts of a transformer layer's name that make it an edge layer: embeddings of the timestep, the text, the
# image size, the caption projection (PixArt) and the context embedder (SD3); plus the patch embedding
_EMBEDDINGS = ("timestep_embedder.", "text_embedder.", "resolution_embedder.", "aspect_ratio_embedder.",
               "caption_projection.", "context_embedder")
# adaLN modulation: DiT's per-block norm1.linear and final proj_out_1, PixArt's shared adaln_single.linear,
# SD3's norm1 / norm1_context / norm_out linears
_MODULATION = ("norm1.linear", "norm1_context.linear", "norm_out.linear", "adaln_single.linear", "proj_out_1")


class TransformerArch(Architecture):
    component = "transformer"
    unit_classes = ("BasicTransformerBlock", "JointTransformerBlock")
    final = "proj_out"  # the last linear: its output is the (patchified) noise prediction

    def edge_layers(self, names: list[str]) -> list[str]:
        return [n for n in names if n in ("pos_embed.proj", self.final) or any(e in n for e in _EMBEDDINGS)]

    def modulation_layers(self, names: list[str]) -> list[str]:
        return [n for n in names if n.endswith(_MODULATION)]

    def float_output_layers(self, names: list[str]) -> list[str]:
        return [n for n in names if n == self.final] + self.modulation_layers(names)


class DiTArch(TransformerArch):
    name = "dit"
    classes = ("DiTTransformer2DModel",)
    final = "proj_out_2"
    guidance_scale = 1.5  # DiT's FID-50K protocol (Peebles & Xie 2023: FID 2.27 for DiT-XL/2 at 256)

    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        return _noise(model(x, timestep=_batch_t(t, x), class_labels=cond["class_labels"]).sample, x)


class PixArtArch(TransformerArch):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)
    guidance_scale = 4.5  # PixArt-alpha (the paper's sampling setting and its pipeline's default)

    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        added = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
        out = model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=_batch_t(t, x),
                    added_cond_kwargs=added, encoder_attention_mask=cond["encoder_attention_mask"]).sample
        return _noise(out, x)


class SD3Arch(TransformerArch):
    name = "sd3"
    classes = ("SD3Transformer2DModel",)
    guidance_scale = 7.0  # SD3 medium (its model card's and pipeline's default)

    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        return model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=_batch_t(t, x),
                     pooled_projections=cond["pooled_projections"]).sample


ARCHITECTURES: tuple[Architecture, ...] = (UNetArch(), DiTArch(), PixArtArch(), SD3Arch())


def architecture_of(model: Any) -> Architecture:
    """The architecture of a denoiser module (a class pqd.diffusion.pipeline supports)."""
    name = type(model).__name__
    for arch in ARCHITECTURES:
        if name in arch.classes:
            return arch
    raise ValueError(f"denoiser class {name} has no architecture: expected one of "
                     f"{', '.join(c for a in ARCHITECTURES for c in a.classes)}")
