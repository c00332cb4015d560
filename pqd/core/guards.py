"""Numerical guards (pure torch): fail loudly, naming the layer, instead of sampling black images."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from pqd.core.qtypes import act_qtype, weight_qtype

from pqd.errors import NumericalError  # noqa: F401 (re-exported: core's callers catch it as guards.NumericalError)

INT32_MAX = 2**31 - 1


def check_layer_qparams(name: str, weight_int: torch.Tensor, weight_scale: torch.Tensor, weight_bits: int,
                        act_scale: torch.Tensor, act_zero_point: torch.Tensor, act_bits: int,
                        out_scale: torch.Tensor | None = None, out_zero_point: torch.Tensor | None = None) -> None:
    """Raise NumericalError unless one layer's quantizer parameters are usable: weight codes inside the signed
    grid, scales finite and > 0, zero points inside the unsigned grid, and the worst-case integer accumulator
    (fan_in x max |weight code| x activation code span) inside int32, as an integer kernel computes it.

    weight_int: integer codes [out, ...]; weight_scale: [out] or [out, groups]; act_* and out_* (output quantizer):
    [G, P]."""
    wq, aq = weight_qtype(weight_bits), act_qtype(act_bits)
    if weight_int.is_floating_point():
        raise NumericalError(f"layer {name}: weight codes are {weight_int.dtype}: expected an integer tensor")
    lo, hi = (int(weight_int.min()), int(weight_int.max())) if weight_int.numel() else (0, 0)
    if lo < wq.qmin or hi > wq.qmax:
        raise NumericalError(f"layer {name}: weight codes in [{lo}, {hi}] overflow the {weight_bits}-bit grid: "
                             f"expected [{wq.qmin}, {wq.qmax}]")
    if not bool(torch.isfinite(weight_scale).all()) or not bool((weight_scale > 0).all()):
        raise NumericalError(f"layer {name}: weight scale {_first_bad(weight_scale)} is not allowed: expected a "
                             "finite number > 0 per output channel (or group)")
    check_act_qparams(name, "activation", act_scale, act_zero_point, act_bits)
    if out_scale is not None:
        check_act_qparams(name, "output", out_scale, out_zero_point, act_bits)
    fan_in = weight_int[0].numel() if weight_int.ndim else 1
    bound = fan_in * max(abs(lo), abs(hi)) * (aq.qmax - aq.qmin)
    if bound > INT32_MAX:
        raise NumericalError(f"layer {name}: the integer accumulator can reach {bound} (fan-in {fan_in}), which "
                             f"overflows int32: expected at most {INT32_MAX}; use fewer activation bits or split the layer")


def check_act_qparams(name: str, what: str, scales: torch.Tensor, zero_points: torch.Tensor, bits: int) -> None:
    """Raise NumericalError unless every (scale, zero point) of one activation quantizer ([G, P]) is usable:
    scales finite and > 0, zero points inside the unsigned ``bits`` grid."""
    aq = act_qtype(bits)
    for g in range(scales.shape[0]):
        s, z = scales[g], zero_points[g]
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise NumericalError(f"layer {name}, time group {g}: {what} scale {_first_bad(s)} is not allowed: "
                                 "expected a finite number > 0")
        if not bool(torch.isfinite(z).all()) or bool((z < aq.qmin).any()) or bool((z > aq.qmax).any()):
            raise NumericalError(f"layer {name}, time group {g}: {what} zero point {z.tolist()} overflows the "
                                 f"{bits}-bit grid: expected values in [{aq.qmin}, {aq.qmax}]")


def check_smoothing(name: str, smooth: torch.Tensor, in_features: int) -> None:
    """Raise NumericalError unless a balanced layer's divisors are usable: one finite number > 0 per input channel."""
    if smooth.shape != (in_features,):
        raise NumericalError(f"layer {name}: {smooth.numel()} smoothing factors for {in_features} input channels: "
                             "expected one per input channel")
    if not bool(torch.isfinite(smooth).all()) or not bool((smooth > 0).all()):
        raise NumericalError(f"layer {name}: smoothing factor {_first_bad(smooth)} is not allowed: expected a finite "
                             "number > 0 per input channel")


def _first_bad(x: torch.Tensor) -> float:
    bad = ~torch.isfinite(x) | (x <= 0)
    return float(x[bad][0]) if bool(bad.any()) else float(x.reshape(-1)[0])


def _tensors(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v] if v.is_floating_point() else []
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _tensors(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _tensors(x)]
    if hasattr(v, "sample") and isinstance(v.sample, torch.Tensor):  # diffusers output objects
        return [v.sample]
    return []


def _finite(v: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(v))


@torch.no_grad()
def locate_nonfinite(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """Rerun ``run()`` (a forward pass of ``model``) with hooks: the first submodule (in the order calls finish, so
    the innermost first) whose output is non-finite while its inputs are finite; "<input>" when the model's own
    input is already non-finite; None when nothing is."""
    found: list[str] = []

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if not found and not _finite((args, kwargs)):
                found.append("<input>" if name == "" else f"<input of {name}>")
            elif not found and not _finite(out):
                found.append(name or "<model>")
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
