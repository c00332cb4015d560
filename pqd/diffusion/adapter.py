"""Architecture knowledge about diffusers models lives here (and only here).

A :class:`Denoiser` wraps what the product needs of a diffusers pipeline: the denoiser network that gets quantized
(a UNet or a transformer, :mod:`pqd.diffusion.archs`), its scheduler config, sample shape, how samples become
images and, for conditioned models, the encoder of its conditioning inputs (:mod:`pqd.diffusion.encoders`).
Everything else in the product talks to a Denoiser, not to a pipeline.

Families: pixel models; latent models (the VQ or KL autoencoder stays in float, outside the quantized part, and
trajectories, calibration and sampling happen in latent space); text-guided models (SD 1.x UNets, PixArt, SD3:
prompt encodings, classifier-free guidance over both branches of every input); class-conditional DiT (guidance
over the null class). A batch's conditioning is a dict of named tensors (``Cond``), the same names the deployed
ONNX graphs take as inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.core.timegroups import set_time_group, TimeGroups
from pqd.diffusion.archs import Architecture, Cond, UNetArch, architecture_of
from pqd.diffusion.encoders import Encoder, encoder_for
from pqd.diffusion.pipeline import check_supported, decoder_of, denoiser_of, load_pipeline, sample_shape_of


def _rows(cond: Cond, idx: torch.Tensor) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


@dataclass
class Conditioning:
    """The conditioning of a set of seeds: each input stored once per prompt (or class), referenced by row.

    ``inputs``: by name, tensors [P + 1, ...], row 0 the unconditional input (empty prompt, null class), rows
    1..P the prompts (classes); ``row_of``: per seed, its row (>= 1); ``guidance_scale``: classifier-free
    guidance weight (1 = the conditional branch only)."""

    inputs: Cond
    row_of: list[int]
    guidance_scale: float

    @property
    def choices(self) -> int:
        """P: the prompts (classes) the seeds take their rows from."""
        return len(next(iter(self.inputs.values()))) - 1

    def subset(self, start: int, end: int) -> "Conditioning":
        """The conditioning of seeds start..end-1 (the inputs are shared, not copied)."""
        return Conditioning(self.inputs, self.row_of[start:end], self.guidance_scale)

    def per_seed(self, device: str | torch.device = "cpu") -> Cond:
        """Per seed, its row of every input: tensors [N, ...]."""
        return {k: v.to(device) for k, v in _rows(self.inputs, torch.tensor(self.row_of, dtype=torch.int64)).items()}

    def unconditional(self, device: str | torch.device = "cpu") -> Cond:
        """Row 0 of every input: tensors [1, ...]."""
        return {k: v[:1].to(device) for k, v in self.inputs.items()}


@dataclass
class Denoiser:
    net: nn.Module  # the denoiser network, a UNet or a transformer
    scheduler_config: dict[str, Any]
    scheduler_class: str
    sample_shape: tuple[int, int, int]  # (C, H, W) of the network's input (latent shape for latent models)
    time_groups: TimeGroups | None = None  # set for a quantized network with time-aware activations
    decoder: nn.Module | None = None  # latent models: the VQ/KL autoencoder, used only to decode (float)
    latent_scale: float = 1.0  # latents are divided by this before decoding (the autoencoder's scaling_factor)
    latent_shift: float = 0.0  # ... then shifted by this (the autoencoder's shift_factor: SD3's KL autoencoder)
    encoder: Encoder | None = None  # conditioned models: prompts (text) or classes -> conditioning inputs
    arch: Architecture = field(default_factory=UNetArch)

    @property
    def conditional(self) -> bool:
        """True when the network takes conditioning inputs (text encodings or class labels)."""
        return self.encoder is not None

    @property
    def family(self) -> str:
        if self.encoder is not None:
            return self.encoder.kind
        return "latent" if self.decoder is not None else "pixel"

    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """``model`` (this denoiser's network, float or quantized) on x [B, C, H, W], t (scalar or [B]) and the
        conditioning inputs by name -> the noise prediction [B, C, H, W]."""
        return self.arch.call(model, x, t, cond)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """Noise prediction for x [B, C, H, W] at timesteps t (scalar or [B]) with ``cond`` (each [B, ...]) or
        None; with time groups, each sample runs in its timestep's group (a mixed batch is split by group)."""
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
            y = self.run_group(x[idx], tb[idx], g, None if cond is None else _rows(cond, idx))
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out[idx] = y
        return out

    def run_group(self, x: torch.Tensor, t: torch.Tensor, group: int, cond: Cond | None = None) -> torch.Tensor:
        """The network on a batch whose timesteps all lie in time group ``group``."""
        if self.time_groups is not None and self.time_groups.count > 1:
            set_time_group(self.net, group)
        return self.call(self.net, x, t, cond)

    def guided(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None, uncond: Cond | None = None,
               guidance_scale: float = 1.0) -> torch.Tensor:
        """Noise prediction with classifier-free guidance: one call on [uncond; cond] (both branches),
        eps_u + g (eps_c - eps_u). ``uncond``: each input [1, ...] or [B, ...]; without it (or g = 1) only the
        conditional branch runs."""
        if cond is None or uncond is None or guidance_scale == 1.0:
            return self.predict(x, t, cond)
        both = {k: torch.cat([uncond[k].expand_as(v), v]) for k, v in cond.items()}
        t = torch.as_tensor(t)
        eps_u, eps_c = self.predict(torch.cat([x, x]), torch.cat([t, t]) if t.ndim else t, both).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    @torch.no_grad()
    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples [-1, 1] (pixel models) or latents (decoded by the float autoencoder) -> images
        [B, 3 or 1, H, W] float32 in [0, 1]."""
        if self.decoder is not None:
            z = x.to(next(self.decoder.parameters()).dtype) / self.latent_scale + self.latent_shift
            x = self.decoder.decode(z).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def conditioning(self, prompts: list[str] | None, row_of: list[int], guidance_scale: float,
                     device: str = "cpu") -> Conditioning:
        """The conditioning rows (the empty prompt and ``prompts``, or the null class and every class) computed
        once; ``row_of`` gives each seed's row (>= 1)."""
        if self.encoder is None:
            raise ValueError("conditioning was asked of an unconditional model: expected no prompts")
        return Conditioning(self.encoder.rows(prompts, device), list(row_of), guidance_scale)

    def probe_conditioning(self, n: int) -> Cond | None:
        """Conditioning inputs for n probe or tracing inputs: the classes in turn (class models) or the empty
        prompt (text models, whose prompts the export stage does not know); None when unconditional."""
        if self.encoder is None:
            return None
        rows = self.encoder.rows(None if self.encoder.kind == "class" else [])
        k = len(next(iter(rows.values())))
        return _rows(rows, torch.tensor([(1 + i) % k for i in range(n)], dtype=torch.int64))

    def example_inputs(self, n: int) -> dict[str, torch.Tensor]:
        """Named inputs of one call on n samples, as a deployed graph takes them: ``sample`` [n, C, H, W],
        ``timestep`` [n] float32, then the conditioning inputs (float32 or int64)."""
        return {"sample": torch.zeros(n, *self.sample_shape), "timestep": torch.full((n,), 10.0),
                **(self.probe_conditioning(n) or {})}

    def edge_layers(self, names: list[str]) -> list[str]:
        return self.arch.edge_layers(names)

    def modulation_layers(self, names: list[str]) -> list[str]:
        return self.arch.modulation_layers(names)

    def float_output_layers(self, names: list[str]) -> list[str]:
        return self.arch.float_output_layers(names)

    def units(self, layer_names: list[str]) -> list[str]:
        return self.arch.units(self.net, layer_names)

    def skip_splits(self) -> dict[str, int]:
        return self.arch.skip_splits(self.net)

    def smooth_layers(self, names: list[str]) -> list[str]:
        return self.arch.smooth_layers(self.net, names)


def denoiser_from_pipeline(pipe) -> Denoiser:
    """The Denoiser of a supported diffusers pipeline (refuses anything else, in one line)."""
    check_supported(pipe)
    _, model = denoiser_of(pipe)
    model.eval().requires_grad_(False)
    decoder, scale, shift = decoder_of(pipe), 1.0, 0.0
    if decoder is not None:
        decoder.eval().requires_grad_(False)
        scale = float(getattr(decoder.config, "scaling_factor", 1.0) or 1.0)
        shift = float(getattr(decoder.config, "shift_factor", 0.0) or 0.0)
    return Denoiser(net=model, scheduler_config=dict(pipe.scheduler.config),
                    scheduler_class=type(pipe.scheduler).__name__, sample_shape=sample_shape_of(model.config),
                    decoder=decoder, latent_scale=scale, latent_shift=shift, encoder=encoder_for(pipe, model),
                    arch=architecture_of(model))


def load_denoiser(folder: str | Path, device: str = "cpu", net: nn.Module | None = None) -> Denoiser:
    """The Denoiser of the pipeline in ``folder`` (``net``: a replacement network, see :func:`load_pipeline`)."""
    return denoiser_from_pipeline(load_pipeline(folder, device, net))
