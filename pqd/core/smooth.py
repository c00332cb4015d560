"""Channel balancing (SmoothQuant's scale migration) for linear layers: pure functions on tensors.

A linear layer y = x Wᵀ + b whose input is quantized per tensor has its grid set by its largest input
channels; transformer activations have a few channels far larger than the rest (ViDiT-Q, PTQ4DiT). Dividing
input channel j by s_j and multiplying column j of W by s_j leaves y unchanged and moves range from the
activation into the weight, which is quantized per output channel and copes better:

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)      (Xiao et al., "SmoothQuant", ICML 2023)

The weights are shared by every time group, so a layer has one s; its activation maxima are gathered per
time group (``ChannelMax``) and the largest over the groups sets s, so no group's channels are left
unbalanced. The activation grids are then fitted per group on the balanced input x / s.
"""

from __future__ import annotations

import torch

_FLOOR = 1e-5  # SmoothQuant's clamp: a channel that never fires must not give a zero or infinite factor


class ChannelMax:
    """Running per-channel absolute maximum of inputs [..., C] (the last dimension is the channel)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
        self.value = m if self.value is None else torch.maximum(self.value, m)


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """The divisor s [C] of a linear layer's input channels.

    act_absmax: [G, C] per-group (or [C]) channel maxima of the input; weight: [out, C]; alpha in (0, 1):
    the share of the activation range moved into the weight (0.5 balances the two)."""
    if not 0 < alpha < 1:
        raise ValueError(f"smoothing alpha = {alpha} is not allowed: expected a number in (0, 1)")
    a = act_absmax.reshape(-1, act_absmax.shape[-1]).amax(dim=0).float().clamp_min(_FLOOR)
    w = weight.detach().abs().float().amax(dim=0).clamp_min(_FLOOR)
    if a.shape != w.shape:
        raise ValueError(f"smoothing: {a.numel()} input channels observed for a weight of {w.numel()}")
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(_FLOOR, 1 / _FLOOR)
