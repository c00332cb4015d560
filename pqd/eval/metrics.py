"""Per-image comparisons of quantized samples with the FP samples of the same seeds."""

from __future__ import annotations

import numpy as np
import torch


def per_image_mse(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Mean squared difference of each pair of images a[i], b[i] ([N, C, H, W] in [0, 1]) -> float [N]."""
    return (a - b).pow(2).flatten(1).mean(1).numpy()


def psnr(mse: np.ndarray) -> np.ndarray:
    """PSNR in dB of images in [0, 1] from their MSE (an MSE of 0 counts as 1e-12: 120 dB)."""
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
