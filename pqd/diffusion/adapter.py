"""Architecture knowledge about diffusers models lives here (and only here).

A :class:`Denoiser` wraps the parts of a diffusers pipeline the product needs: the UNet that gets
quantized, the scheduler config it is sampled with, the shape of its samples and how samples become
images. Everything else in the product talks to a Denoiser, not to a pipeline class.

Three families are supported:
- pixel models (``UNet2DModel``, with or without attention blocks: DDPM/DDIM pipelines);
- latent models: a ``UNet2DModel`` or ``UNet2DConditionModel`` denoising in the latent space of a VQ or KL
  autoencoder (``vqvae`` / ``vae`` component). The autoencoder's decoder stays in float, outside the
  quantized part; trajectories, calibration and sampling all happen in latent space;
- text-guided models (``UNet2DConditionModel`` with a text encoder and tokenizer, Stable Diffusion 1.x
  style): cross-attention on the prompt's encoder hidden states, classifier-free guidance (the UNet sees
  the unconditional and the conditional branch of every input).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.core.timegroups import set_time_group, TimeGroups
from pqd.diffusion.pipeline import check_supported, decoder_of, load_pipeline, unet_sample_shape

# layers kept at a higher weight precision by default: the first and last convolutions and the
# time-embedding MLP (small, and errors there reach every block)
EDGE_LAYER_PREFIXES = ("conv_in", "conv_out", "time_embedding.")

# the units that block reconstruction optimises one at a time; any quantized layer outside them is a unit
# of its own. Named by class so every UNet built from diffusers' blocks is covered.
UNIT_CLASSES = ("ResnetBlock2D", "Attention", "Transformer2DModel", "Downsample2D", "Upsample2D")


def unet_forward(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """One UNet call: x [B, C, H, W], t scalar or [B], cond (encoder hidden states [B, L, D]) or None."""
    if cond is None:
        return unet(x, t).sample
    return unet(x, t, encoder_hidden_states=cond).sample


@dataclass
class Conditioning:
    """Text conditioning of a set of seeds: prompt embeddings stored once, referenced by index.

    ``embeds``: float32 [P + 1, L, D], row 0 the unconditional (empty) prompt, rows 1..P the prompts;
    ``prompt_of``: per seed, its row (>= 1); ``guidance_scale``: classifier-free guidance weight
    (1 = the conditional branch only)."""

    embeds: torch.Tensor
    prompt_of: list[int]
    guidance_scale: float

    def subset(self, start: int, end: int) -> "Conditioning":
        """The conditioning of seeds start..end-1 (the embeddings are shared, not copied)."""
        return Conditioning(self.embeds, self.prompt_of[start:end], self.guidance_scale)

    def hidden_states(self) -> torch.Tensor:
        """Per seed, its prompt's encoder hidden states [N, L, D]."""
        return self.embeds[torch.tensor(self.prompt_of, dtype=torch.int64)]


@dataclass
class TextEncoder:
    """A pipeline's tokenizer + text encoder (kept in float, never quantized)."""

    tokenizer: Any
    model: nn.Module

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str = "cpu") -> torch.Tensor:
        """Prompts -> encoder hidden states float32 [P, L, D] (padded to the tokenizer's max length, as SD 1.x)."""
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(device) if getattr(self.model.config, "use_attention_mask", False) else None
        return self.model(tok.input_ids.to(device), attention_mask=mask)[0].to(torch.float32)


@dataclass
class Denoiser:
    unet: nn.Module
    scheduler_config: dict[str, Any]
    scheduler_class: str
    sample_shape: tuple[int, int, int]  # (C, H, W) of the UNet's input (latent shape for latent models)
    time_groups: TimeGroups | None = None  # set for a quantized UNet with time-aware activations
    decoder: nn.Module | None = None  # latent models: the VQ/KL autoencoder, used only to decode (float)
    latent_scale: float = 1.0  # latents are divided by this before decoding (the autoencoder's scaling_factor)
    text: TextEncoder | None = None  # text-guided models

    @property
    def conditional(self) -> bool:
        """True when the UNet takes encoder hidden states (cross-attention on text embeddings)."""
        return self.text is not None

    @property
    def family(self) -> str:
        return "text" if self.conditional else "latent" if self.decoder is not None else "pixel"

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """UNet output (noise prediction) for inputs x [B, C, H, W] at timesteps t (scalar or [B]) with
        encoder hidden states cond [B, L, D] (text models) or None.

        With time groups, each sample runs with the activation parameters of its timestep's group
        (a batch that mixes groups is split by group)."""
        t = torch.as_tensor(t, device=x.device)
        if self.time_groups is None or self.time_groups.count == 1:
            return self.run_group(x, t, 0, cond)
        tb = t.expand(x.shape[0]) if t.ndim == 0 else t
        groups = self.time_groups.group_of(tb.cpu())
        present = groups.unique().tolist()
        if len(present) == 1:
            return self.run_group(x, t, present[0], cond)
        out = None
        for g in present:
            idx = (groups == g).nonzero().squeeze(1).to(x.device)
            y = self.run_group(x[idx], tb[idx], g, None if cond is None else cond[idx])
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out[idx] = y
        return out

    def run_group(self, x: torch.Tensor, t: torch.Tensor, group: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet on a batch whose timesteps all lie in time group ``group``."""
        if self.time_groups is not None and self.time_groups.count > 1:
            set_time_group(self.unet, group)
        return unet_forward(self.unet, x, t, cond)

    def guided(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
               uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """Noise prediction with classifier-free guidance: one UNet call on [uncond; cond] (both branches),
        eps_u + g (eps_c - eps_u). ``uncond`` [1, L, D] or [B, L, D]; without it (or g = 1) only the
        conditional branch runs."""
        if cond is None or uncond is None or guidance_scale == 1.0:
            return self.predict(x, t, cond)
        eps_u, eps_c = self.predict(torch.cat([x, x]), t, torch.cat([uncond.expand_as(cond), cond])).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    @torch.no_grad()
    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples [-1, 1] (pixel models) or latents (decoded by the float autoencoder) -> images
        [B, 3 or 1, H, W] float32 in [0, 1]."""
        if self.decoder is not None:
            x = self.decoder.decode(x.to(next(self.decoder.parameters()).dtype) / self.latent_scale).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def conditioning(self, prompts: list[str], prompt_of: list[int], guidance_scale: float,
                     device: str = "cpu") -> Conditioning:
        """Encode the empty prompt and ``prompts`` once; ``prompt_of`` gives each seed's row (>= 1)."""
        if self.text is None:
            raise ValueError("prompts were given for a model without a text encoder: expected no prompts")
        return Conditioning(self.text.encode([""] + list(prompts), device).cpu(), list(prompt_of), guidance_scale)

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


def denoiser_from_pipeline(pipe) -> Denoiser:
    """The Denoiser of a pixel, latent or text-guided diffusers pipeline (refuses anything else, in one line)."""
    check_supported(pipe)
    unet = pipe.unet.eval().requires_grad_(False)
    decoder = decoder_of(pipe)
    if decoder is not None:
        decoder.eval().requires_grad_(False)
    text = None
    if type(unet).__name__ == "UNet2DConditionModel":
        text = TextEncoder(pipe.tokenizer, pipe.text_encoder.eval().requires_grad_(False))
    scale = float(getattr(decoder.config, "scaling_factor", 1.0) or 1.0) if decoder is not None else 1.0
    return Denoiser(unet=unet, scheduler_config=dict(pipe.scheduler.config),
                    scheduler_class=type(pipe.scheduler).__name__, sample_shape=unet_sample_shape(unet),
                    decoder=decoder, latent_scale=scale, text=text)


def load_denoiser(folder: str | Path, device: str = "cpu", unet: nn.Module | None = None) -> Denoiser:
    """The Denoiser of the pipeline in ``folder`` (``unet``: a replacement UNet, see :func:`load_pipeline`)."""
    return denoiser_from_pipeline(load_pipeline(folder, device, unet))


