"""The demos' data and FID features: scikit-learn's bundled 8x8 digits (``demo:digits``), the same digits as
16x16 RGB (``demo:digits16``), and DigitNet, the small CNN whose penultimate features are the demos' FID features.

Read by the demos' training (:mod:`pqd.diffusion.demo`) and by the FID extractor and reference (pqd.eval.fid),
which need no training code. Everything here is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS16_HUE_SEED = 0  # the stroke colours of demo:digits16 are part of the data set, not of a model's seed


def _sklearn_digits():
    """scikit-learn's bundled digits (imported here: scikit-learn takes a second to import, and most stage processes
    never read the digits)."""
    from sklearn.datasets import load_digits

    return load_digits()


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: images float32 [1797, 1, 8, 8] in [-1, 1], labels int64 [1797]."""
    d = _sklearn_digits()
    images = torch.from_numpy(d.images).float().reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return images, torch.from_numpy(d.target).long()


def digits16_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as 16x16 RGB (``demo:digits16``): images float32 [1797, 3, 16, 16] in [-1, 1], labels int64.

    Each 8x8 digit g in [0, 1] is upsampled bilinearly to 16x16, then coloured with a per-image hue h:
    channel k = g + cos(h + 2 pi k / 3) * min(g, 1 - g). The three cosines sum to 0, so every pixel's channel
    mean is g (the gray digit the FID extractor reads) and every value stays in [0, 1]; black background and
    full-intensity stroke centres stay gray, the stroke edges carry the colour.
    """
    images, labels = load_digits_tensor()
    g = F.interpolate((images + 1) / 2, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    hue = torch.rand(len(g), generator=torch.Generator().manual_seed(DIGITS16_HUE_SEED)) * 2 * math.pi
    tint = torch.cos(hue[:, None] + torch.arange(3) * 2 * math.pi / 3)[:, :, None, None]  # [N, 3, 1, 1]
    return (g + tint * torch.minimum(g, 1 - g)) * 2 - 1, labels


def demo_images(source: str) -> torch.Tensor:
    """The training images of demo ``source`` ('demo:digits' or 'demo:digits16'), float32 [N, C, H, W] in [-1, 1]."""
    return digits16_tensor()[0] if source == "demo:digits16" else load_digits_tensor()[0]


def reference_uint8(source: str) -> np.ndarray:
    """The FID reference images of demo ``source`` as uint8: [1797, 8, 8] (digits, 0..16 scaled to 0..255, rounded)
    or [1797, 16, 16, 3] (digits16)."""
    if source == "demo:digits16":
        return (digits16_tensor()[0].permute(0, 2, 3, 1).add(1).mul(255 / 2)).round().to(torch.uint8).numpy()
    return np.round(_sklearn_digits().images * 255.0 / 16.0).astype(np.uint8)


class DigitNet(nn.Module):
    """Small CNN for digits [B, 1, 8, 8] in [-1, 1]; its penultimate features are the demo's FID features."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.width, self.feature_dim, self.num_classes = width, feature_dim, num_classes
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.drop = nn.Dropout(0.3)

    def config(self) -> dict[str, int]:
        """Constructor arguments (plain ints): ``DigitNet(**net.config())`` rebuilds the architecture."""
        return {"width": self.width, "feature_dim": self.feature_dim, "num_classes": self.num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, 8, 8] float32 in [-1, 1] -> features [B, feature_dim] float32 (after the ReLU, >= 0)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8 -> 4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 4 -> 2
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, 8, 8] float32 in [-1, 1] -> class logits [B, num_classes]."""
        return self.head(self.drop(self.features(x)))
