"""Error-compensating weight rounding (GPTQ: Frantar et al., 2023) on the product's weight grids (per output channel
or per group of input channels).

The weights of a layer are rounded one input column at a time; each column's rounding error is spread over the
columns not yet rounded, in proportion to the layer's input Hessian ``H = E[x xᵀ]`` from the calibration set, so
that the layer's output ``W x`` moves as little as possible. Columns are taken in decreasing order of ``diag(H)``
(the inputs with the most energy first). The scales stay those of the nearest-rounding fit: only the codes change.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.core.affine import weight_scale_like
from pqd.core.qtypes import QType

BLOCK = 128  # columns updated together (the result does not depend on it; lazy batch updates)


def layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows that ``layer``'s weight (reshaped to [out, d]) multiplies: [N, d] float32. A Conv2d's input patches
    (zero padding; channel-major, the order of ``weight.reshape(out, -1)``), a Linear's input vectors."""
    x = x.detach().to(torch.float32)
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [B, d, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def supported(layer: nn.Module) -> bool:
    """GPTQ here covers Linear and ungrouped Conv2d layers (a grouped convolution keeps nearest rounding)."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


class Hessian:
    """Running ``E[x xᵀ]`` of a layer's input rows; at most ``max_rows`` rows of each batch are used (a fixed
    stride through them), which bounds the cost on large feature maps."""

    def __init__(self, layer: nn.Module, max_rows: int = 4096) -> None:
        self.layer, self.max_rows = layer, max_rows
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        r = layer_rows(self.layer, x)
        if len(r) > self.max_rows:
            r = r[:: -(-len(r) // self.max_rows)]
        if not torch.isfinite(r).all():
            raise FloatingPointError("non-finite input")
        xtx = r.T @ r
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.rows += len(r)

    def value(self) -> torch.Tensor:
        if self.sum is None:
            raise RuntimeError("the layer received no input")
        return self.sum / self.rows


@torch.no_grad()
def input_hessian(net: nn.Module, layer: nn.Module, run: Callable[[nn.Module], object]) -> torch.Tensor:
    """``layer``'s input Hessian (:class:`Hessian`) over what ``run(net)`` feeds it (``layer`` is a module of
    ``net``)."""
    h = Hessian(layer)
    handle = layer.register_forward_pre_hook(lambda _m, args: h.update(args[0]))
    try:
        run(net)
    finally:
        handle.remove()
    return h.value()


def gptq_codes(weight: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor, qtype: QType,
               damp: float = 0.01) -> torch.Tensor:
    """Integer codes (int8, ``weight``'s shape) for ``weight`` [out, ...] on the symmetric grid ``scale`` ([out] per
    output channel, or [out, groups] per group of input channels), rounded with error compensation under ``hessian``
    [d, d] (d = weight[0].numel()). ``damp``: the fraction of the mean diagonal added to the diagonal (numerical
    stability; larger is closer to nearest)."""
    shape = weight.shape
    W = weight.detach().reshape(shape[0], -1).to(torch.float64).clone()
    H = hessian.detach().to(torch.float64).clone()
    d = W.shape[1]
    if H.shape != (d, d):
        raise ValueError(f"gptq: a Hessian of shape {tuple(H.shape)} for a weight with {d} input columns")
    s = weight_scale_like(scale.detach().to(torch.float64), shape).expand(shape).reshape(shape[0], -1)  # per column
    dead = torch.diagonal(H) <= 0  # inputs that are always zero: their weights do not matter, keep them nearest
    H[dead, dead] = 1.0
    order = torch.argsort(torch.diagonal(H), descending=True)
    W, H, s = W[:, order], H[order][:, order], s[:, order].contiguous()
    H.diagonal().add_(damp * float(torch.diagonal(H).mean()))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H⁻¹ = Uᵀ U
    Q = torch.empty_like(W)
    for a in range(0, d, BLOCK):
        b = min(a + BLOCK, d)
        Wb, Ub = W[:, a:b].clone(), U[a:b, a:b]
        err = torch.empty_like(Wb)
        for i in range(b - a):
            si = s[:, a + i:a + i + 1]
            q = torch.clamp(torch.round(Wb[:, i:i + 1] / si), qtype.qmin, qtype.qmax)
            Q[:, a + i:a + i + 1] = q
            e = (Wb[:, i:i + 1] - q * si) / Ub[i, i]
            Wb[:, i:] -= e @ Ub[i:i + 1, i:]
            err[:, i:i + 1] = e
        W[:, b:] -= err @ U[a:b, b:]
    codes = torch.empty_like(Q)
    codes[:, order] = Q
    return codes.reshape(shape).to(torch.int8)
