"""Affine quantization math: pure functions on tensors.

``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x_hat = (q - zero_point) * scale``.
Weights use a symmetric signed grid per output channel (zero_point = 0), or per group of input channels within an
output channel (scale [out, groups]: :func:`weight_scales` with a group size); activations an asymmetric unsigned
grid per tensor, or (:func:`symmetric_act_qparams`) one with its zero point at code 0 or at the middle code.
"""

from __future__ import annotations

import torch

from pqd.core.qtypes import QType

_EPS = 1e-12


def _bcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape per-axis parameters of shape [x.shape[axis]] so they broadcast against x."""
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qtype: QType,
             axis: int | None = None) -> torch.Tensor:
    """Float tensor -> integer codes (int32 tensor, values in [qmin, qmax])."""
    q = torch.round(x / _bcast(scale, x, axis)) + _bcast(zero_point, x, axis)
    return q.clamp_(qtype.qmin, qtype.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: int | None = None) -> torch.Tensor:
    """Integer codes -> float32 values ``(q - zero_point) * scale``."""
    return (q.to(torch.float32) - _bcast(zero_point, q, axis)) * _bcast(scale, q, axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qtype: QType,
                  axis: int | None = None) -> torch.Tensor:
    """Quantize then dequantize, in x's dtype (simulated quantization)."""
    s = _bcast(scale, x, axis).to(x.dtype)
    z = _bcast(zero_point, x, axis).to(x.dtype)
    q = (torch.round(x / s) + z).clamp(qtype.qmin, qtype.qmax)
    return (q - z) * s


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity backward)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qtype: QType) -> torch.Tensor:
    """:func:`fake_quantize` (per tensor) with straight-through rounding: differentiable in x and scale (LSQ)."""
    q = (round_ste(x / scale) + zero_point).clamp(qtype.qmin, qtype.qmax)
    return (q - zero_point) * scale


def symmetric_scale(absmax: torch.Tensor, qtype: QType) -> torch.Tensor:
    """Scale that maps [-absmax, absmax] onto the signed grid (qmax steps each side)."""
    return (absmax / qtype.qmax).clamp_min(_EPS)


def asymmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point mapping [lo, hi] (widened to contain 0) onto [qmin, qmax]."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (qtype.qmax - qtype.qmin)).clamp_min(_EPS)
    zero_point = (qtype.qmin - torch.round(lo / scale)).clamp(qtype.qmin, qtype.qmax)
    return scale, zero_point


def symmetric_act_qparams(lo: torch.Tensor, hi: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
    """An unsigned grid with no offset to subtract: a range that never goes below 0 gets zero point 0 and every code
    over [0, hi]; any other gets the middle code (128 for uint8) as its zero point and max(-lo, hi) / (middle - 1) as
    its step, which is the grid of a signed integer with zero point 0 (int8: codes -128..127), as the exporter writes
    it (:func:`pqd.deploy.rewrite.signed_activation_grids`)."""
    if bool(lo >= 0):
        return (hi / (qtype.qmax - qtype.qmin)).clamp_min(_EPS), torch.tensor(float(qtype.qmin))
    mid = (qtype.qmax - qtype.qmin + 1) // 2
    absmax = torch.maximum(-lo, hi)
    return (absmax / (mid - 1)).clamp_min(_EPS), torch.tensor(float(qtype.qmin + mid))


def group_width(channels: int, groups: int) -> int:
    """Input channels per group when ``channels`` are split into ``groups`` groups: ceil(channels / groups) (the
    last group may be narrower)."""
    return -(-channels // groups)


def weight_groups(channels: int, group_size: int) -> int:
    """How many groups of at most ``group_size`` input channels ``channels`` take (1: per output channel).
    ``group_size`` 0 is per output channel."""
    return 1 if group_size <= 0 else -(-channels // group_size)


def weight_scale_like(scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A weight scale (per output channel [out], or per group of input channels [out, groups]) shaped to broadcast
    against a weight of ``shape`` [out, in, ...]: [out, 1, ...] or [out, in, 1, ...] (each group's scale repeated
    over its channels)."""
    rest = [1] * (len(shape) - 1)
    if scale.ndim == 1:
        return scale.reshape(-1, *rest)
    width = group_width(shape[1], scale.shape[1])
    return scale.repeat_interleave(width, dim=1)[:, :shape[1]].reshape(shape[0], shape[1], *rest[1:])


def weight_codes(w: torch.Tensor, scale: torch.Tensor, qtype: QType) -> torch.Tensor:
    """Nearest-rounded integer codes (int8, ``w``'s shape) of a weight on its symmetric grid ``scale``."""
    s = weight_scale_like(scale, w.shape)
    return quantize(w.detach().to(torch.float32), s, torch.zeros_like(s), qtype).to(torch.int8)


def weight_values(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weight ``codes x scale`` (per output channel or per group of input channels)."""
    return codes.to(torch.float32) * weight_scale_like(scale, codes.shape)


def _row_scales(flat: torch.Tensor, qtype: QType, method: str, grid: int, min_ratio: float) -> torch.Tensor:
    absmax = flat.abs().amax(dim=1)
    if method == "minmax":
        return symmetric_scale(absmax, qtype)
    if method != "mse":
        raise ValueError(f"weight range method {method!r} is not allowed: expected 'minmax' or 'mse'")
    best_err = torch.full_like(absmax, float("inf"))
    best = symmetric_scale(absmax, qtype)
    zero = torch.zeros_like(absmax)
    for ratio in torch.linspace(min_ratio, 1.0, grid).tolist():
        s = symmetric_scale(absmax * ratio, qtype)
        err = (fake_quantize(flat, s, zero, qtype, axis=0) - flat).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def weight_scales(w: torch.Tensor, qtype: QType, method: str, grid: int = 80,
                  min_ratio: float = 0.3, group_size: int = 0) -> torch.Tensor:
    """Symmetric scales for a weight [out, in, ...]: each row's absolute maximum (``minmax``) or, ``mse``, the
    clipping ratio in [min_ratio, 1] of it with the least squared error. A row is an output channel (float32 [out])
    or, with ``group_size`` > 0 and more input channels than that, a group of ceil(in / groups) input channels of an
    output channel (float32 [out, groups], groups = ceil(in / group_size))."""
    w = w.detach().to(torch.float32)
    groups = weight_groups(w.shape[1], group_size) if w.ndim > 1 else 1
    if groups == 1:
        return _row_scales(w.reshape(w.shape[0], -1), qtype, method, grid, min_ratio)
    width = group_width(w.shape[1], groups)
    pad = groups * width - w.shape[1]  # zero channels change neither a group's maximum nor its error
    padded = torch.cat([w, w.new_zeros(w.shape[0], pad, *w.shape[2:])], dim=1) if pad else w
    rows = padded.reshape(w.shape[0] * groups, -1)
    return _row_scales(rows, qtype, method, grid, min_ratio).reshape(w.shape[0], groups)


def act_qparams(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qtype: QType, method: str,
                grid: int = 60, min_ratio: float = 0.2, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric (scale, zero_point), both float32 scalars, from the observed extremes ``lo`` / ``hi``;
    ``mse`` shrinks each side by ratios in [min_ratio, 1], keeping the least squared error on ``values`` (a sample).
    ``symmetric``: the grid of :func:`symmetric_act_qparams` (``mse``: the least-error grid without an offset,
    :func:`_symmetric_search`)."""
    if method not in ("minmax", "mse"):
        raise ValueError(f"activation range method {method!r} is not allowed: expected 'minmax' or 'mse'")
    if symmetric:
        return _symmetric_search(values, lo, hi, qtype, grid, min_ratio) if method == "mse" \
            else symmetric_act_qparams(lo, hi, qtype)
    if method == "minmax":
        return asymmetric_qparams(lo, hi, qtype)
    v = values.detach().reshape(-1).to(torch.float32)
    ratios = torch.linspace(min_ratio, 1.0, grid)
    best_err, best = float("inf"), asymmetric_qparams(lo, hi, qtype)
    # the two sides are searched one after the other: the positive side at full negative range,
    # then the negative side at the best positive clip (coordinate descent, 2 x grid evaluations)
    best_hi = hi
    for r in ratios.tolist():
        s, z = asymmetric_qparams(lo, hi * r, qtype)
        err = (fake_quantize(v, s, z, qtype) - v).pow(2).sum().item()
        if err < best_err:
            best_err, best, best_hi = err, (s, z), hi * r
    for r in ratios.tolist():
        s, z = asymmetric_qparams(lo * r, best_hi, qtype)
        err = (fake_quantize(v, s, z, qtype) - v).pow(2).sum().item()
        if err < best_err:
            best_err, best = err, (s, z)
    return best


def _symmetric_search(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qtype: QType, grid: int,
                      min_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid without an offset with the least squared error on ``values``: :func:`symmetric_act_qparams` of
    [lo, hi] with its step shrunk by a ratio in [min_ratio, 1], or, for a tensor that goes below 0, the unsigned grid
    from 0 (its negatives clipped to 0) shrunk the same way: a SiLU output's few small negatives can cost less clipped
    than the bit a signed grid spends on them."""
    v = values.detach().reshape(-1).to(torch.float32)
    full = symmetric_act_qparams(lo, hi, qtype)
    starts = [full] + ([symmetric_act_qparams(torch.zeros_like(lo), hi, qtype)] if bool(lo < 0) and bool(hi > 0)
                       else [])
    best_err, best = float("inf"), full
    for s0, z in starts:
        for r in torch.linspace(min_ratio, 1.0, grid).tolist():
            s = s0 * r
            err = (fake_quantize(v, s, z, qtype) - v).pow(2).sum().item()
            if err < best_err:
                best_err, best = err, (s, z)
    return best
