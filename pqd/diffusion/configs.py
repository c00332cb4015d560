"""Architecture configs of reference models, for benchmarks and tests that need their shape but not their
weights (nothing is downloaded: the weights are random).

``CIFAR10_DDPM_UNET`` is the ``unet/config.json`` of google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 DDPM as
converted by diffusers), key for key, without the ``_class_name`` / ``_diffusers_version`` bookkeeping:
35.7M parameters, four levels, self-attention at 16x16 in the down and the (mirrored) up path.
"""

from __future__ import annotations

from typing import Any

import torch

CIFAR10_DDPM_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": (128, 256, 256, 256),
    "center_input_sample": False,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}
# google/ddpm-cifar10-32's scheduler/scheduler_config.json
CIFAR10_DDPM_SCHEDULER: dict[str, Any] = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                          "num_train_timesteps": 1000, "clip_sample": True,
                                          "variance_type": "fixed_small"}


def cifar10_ddpm_pipeline(seed: int = 0, **unet_overrides: Any):
    """A DDPMPipeline with the google/ddpm-cifar10-32 architecture (``unet_overrides`` change single keys,
    e.g. smaller widths for tests) and random weights from ``seed``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**{**CIFAR10_DDPM_UNET, **unet_overrides})
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**CIFAR10_DDPM_SCHEDULER))
