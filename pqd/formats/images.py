"""Images on disk and on screen: float tensors to uint8 PNGs, grids, FP-beside-quantized pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float images [N, C, H, W] in [0, 1] -> uint8 [N, H, W, C] (rounded)."""
    x = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return x.permute(0, 2, 3, 1).numpy()


def save_pngs(images: torch.Tensor, folder: str | Path, names: list[str]) -> None:
    """Write each image [C, H, W] in [0, 1] as ``folder/<name>.png`` (grayscale when C == 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for arr, name in zip(to_uint8(images), names):
        img = Image.fromarray(arr[..., 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr)
        img.save(folder / f"{name}.png")


def image_grid(images: torch.Tensor, cols: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile images [N, C, H, W] in [0, 1] into one RGB PIL image, upscaled by ``scale`` (nearest)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, cl = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + cl * (w + pad): pad + cl * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def side_by_side(left: torch.Tensor, right: torch.Tensor, n: int) -> Image.Image:
    """Grid of the first n images of ``left`` beside the grid of the first n of ``right`` (same seeds:
    FP on the left, quantized on the right)."""
    n = min(n, len(left))
    cols = max(1, int(np.ceil(np.sqrt(n))))
    scale = max(1, 256 // (cols * left.shape[-1]))
    a, b = image_grid(left[:n], cols, scale), image_grid(right[:n], cols, scale)
    out = Image.new("RGB", (a.width + b.width + 16, a.height), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width + 16, 0))
    return out
