"""Architecture configs of reference models, for benchmarks and tests that need their shape but not their
weights (nothing is downloaded: the weights are random).

Each is the denoiser's ``config.json`` of the hub checkpoint, key for key, without the ``_class_name`` /
``_diffusers_version`` bookkeeping (build them with the class's ``from_config``, which ignores the keys of the
legacy ``Transformer2DModel`` that the DiT and PixArt configs still carry):

- ``CIFAR10_DDPM_UNET``: ``unet/config.json`` of google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 DDPM as converted by
  diffusers): 35.7M parameters, four levels, self-attention at 16x16 in the down and the (mirrored) up path;
- ``DIT_XL_2_256``: ``transformer/config.json`` of facebook/DiT-XL-2-256 (class name ``Transformer2DModel``,
  diffusers 0.12.0.dev0, remapped to ``DiTTransformer2DModel`` by its norm type): 28 blocks of width 1152
  (16 heads x 72), patch 2 on 32x32x4 latents, 1000 classes, learned variance (8 output channels);
- ``PIXART_XL_2_512``: ``transformer/config.json`` of PixArt-alpha/PixArt-XL-2-512x512 (``Transformer2DModel``,
  remapped to ``PixArtTransformer2DModel``): the same 28 x 1152 trunk with adaLN-single, cross-attention on
  T5-XXL encodings (4096 channels, 120 tokens) and 64x64x4 latents (no size conditions below 1024 px);
- ``SD3_MEDIUM``: ``transformer/config.json`` of stabilityai/stable-diffusion-3-medium-diffusers
  (``SD3Transformer2DModel``): 24 MMDiT blocks of width 1536 (24 heads x 64), 128x128x16 latents,
  pooled text projections of 2048, joint attention on 4096-wide text encodings.

The DiT and PixArt configs agree with the architecture arguments of diffusers' conversion scripts
(scripts/convert_dit_to_diffusers.py, convert_pixart_alpha_to_diffusers.py), the SD3 config with public copies
of the hub file; tests/diffusion/test_archs.py builds each on the meta device and checks its parameter count
against the checkpoint's (DiT-XL/2 675,129,632 as facebookresearch/DiT counts them; PixArt-XL-2 610,856,096;
SD3 medium 2,028,328,000).
"""

from __future__ import annotations

from typing import Any

import torch

CIFAR10_DDPM_UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": (128, 256, 256, 256),
    "center_input_sample": False, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}
# google/ddpm-cifar10-32's scheduler/scheduler_config.json
CIFAR10_DDPM_SCHEDULER: dict[str, Any] = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                          "num_train_timesteps": 1000, "clip_sample": True,
                                          "variance_type": "fixed_small"}

DIT_XL_2_256: dict[str, Any] = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
    "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
    "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
    "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 8, "patch_size": 2,
    "sample_size": 32, "upcast_attention": False, "use_linear_projection": False,
}
PIXART_XL_2_512: dict[str, Any] = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
    "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
    "double_self_attention": False, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
    "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False,
    "out_channels": 8, "patch_size": 2, "sample_size": 64, "upcast_attention": False, "use_linear_projection": False,
}
SD3_MEDIUM: dict[str, Any] = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "sample_size": 128,
}
# stabilityai/stable-diffusion-3-medium-diffusers's scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
SD3_MEDIUM_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


def cifar10_ddpm_pipeline(seed: int = 0, **unet_overrides: Any):
    """A DDPMPipeline with the google/ddpm-cifar10-32 architecture (``unet_overrides`` change single keys,
    e.g. smaller widths for tests) and random weights from ``seed``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**{**CIFAR10_DDPM_UNET, **unet_overrides})
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**CIFAR10_DDPM_SCHEDULER))
