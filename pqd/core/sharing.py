"""One tensor, one grid: quantizers of the same activation share their parameters (pure torch).

Unshared, an attention block's Q, K and V projections would put the same hidden states on three grids, and a
projection's output grid would be requantized onto the matmul's operand grid (DequantizeLinear -> QuantizeLinear).
Shared, they are one set of per-time-group parameters, learned once by reconstruction, traced as identical nodes
that onnxruntime merges, or as DQ -> Q pairs of equal parameters, which it removes.

A quantizer is named by a :data:`Role`: (module name, ``in`` (a layer's input or a glue site) | ``out`` | ``a`` /
``b`` (a matmul's operands)). :func:`shared_inputs` finds the groups from one forward pass of the float model;
:func:`share_qparams` makes a fitted state agree with them; :func:`tie_quantizers` makes a quantized model's
members hold one parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn as nn

from pqd.core.modules import QUANTIZABLE, ActQuantizer, MatMul, Site, quant_layers, quant_matmuls, quant_sites

Role = tuple[str, str]  # (module name, "in" | "out" | "a" | "b")
Group = tuple[Role, ...]


def _elements(x: torch.Tensor) -> tuple:
    """What identifies the elements of ``x``: a view that reshapes or transposes a whole tensor has the same."""
    return x.untyped_storage().data_ptr(), x.storage_offset(), x.numel(), x.dtype


@torch.no_grad()
def shared_inputs(model: nn.Module, run_once: Callable[[nn.Module], object], exclude: Iterable[str] = (),
                  outputs: Iterable[str] = (), through: dict[str, str] | None = None) -> tuple[Group, ...]:
    """Groups (two or more) of the quantizers of ``model``'s float Conv2d/Linear layers, MatMuls and glue Sites that
    see the same elements in ``run_once(model)`` (one forward pass): layer inputs, matmul operands, sites, and the
    outputs of the layers named in ``outputs`` (those whose outputs are quantized). Each group leads with the
    quantizer whose grid the others take: a site, else a layer output (the grid the integer kernel writes), else
    the first in module order. Layers named in ``exclude`` (inputs split or rescaled before quantization) are left
    out. ``through`` maps a layer to the module whose input it reads through an operation that keeps every value on
    its grid (zero padding, nearest upsampling): the layer counts as reading that input."""
    skip, writers, via = set(exclude), set(outputs) - set(exclude), dict(through or {})
    watched = {n: m for n, m in model.named_modules() if isinstance(m, (*QUANTIZABLE, MatMul, Site)) and n not in skip}
    order = {n: i for i, n in enumerate(watched)}
    seen: dict[tuple, tuple[torch.Tensor, list[Role]]] = {}  # elements -> (a tensor kept alive, quantizers)

    def note(x: object, role: Role) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            entry = seen.setdefault(_elements(x), (x, []))
            if role not in entry[1]:
                entry[1].append(role)

    def pre(m: nn.Module, args: tuple, name: str) -> None:
        if isinstance(m, MatMul):
            note(args[0], (name, "a"))
            note(args[1], (name, "b"))
        elif args:
            note(args[0], (name, "in"))

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: pre(m, a, n)) for n, m in watched.items() if n not in via]
    handles += [model.get_submodule(w).register_forward_pre_hook(lambda m, a, n=n: note(a[0], (n, "in")))
                for n, w in via.items() if n in watched]
    handles += [watched[n].register_forward_hook(lambda m, a, y, n=n: note(y, (n, "out"))) for n in writers if n in watched]
    try:
        run_once(model)
    finally:
        for h in handles:
            h.remove()

    def rank(r: Role) -> tuple:
        return not isinstance(watched[r[0]], Site), r[1] != "out", order[r[0]], r[1]

    groups = {tuple(sorted(roles, key=rank)) for _, roles in seen.values() if len(roles) > 1}
    return tuple(sorted(groups, key=lambda g: rank(g[0])))


def _grid(state: dict, role: Role) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(bits, scale, zero point) of quantizer ``role`` in a QState, if it has a single-part one."""
    name, side = role
    lp = state.get(name)
    if lp is None:
        return None
    if lp.kind == "site":
        return (lp.bits, lp.scale, lp.zero_point) if side == "in" else None
    if lp.kind == "matmul":
        return {"a": (lp.a_bits, lp.a_scale, lp.a_zero_point), "b": (lp.b_bits, lp.b_scale, lp.b_zero_point)}.get(side)
    if lp.act_split is not None or (side == "in" and lp.smooth is not None):
        return None
    if side == "in":
        return lp.act_bits, lp.act_scale, lp.act_zero_point
    return (lp.act_bits, lp.out_scale, lp.out_zero_point) if side == "out" and lp.out_scale is not None else None


_FIELDS = {("linear", "in"): ("act_scale", "act_zero_point"), ("conv2d", "in"): ("act_scale", "act_zero_point"),
           ("linear", "out"): ("out_scale", "out_zero_point"), ("conv2d", "out"): ("out_scale", "out_zero_point"),
           ("matmul", "a"): ("a_scale", "a_zero_point"), ("matmul", "b"): ("b_scale", "b_zero_point")}


def share_qparams(state: dict, groups: Iterable[Group]) -> tuple[dict, tuple[Group, ...]]:
    """``state`` with each group's members on its lead's grid, and the groups as applied: the lead is the first
    quantizer of the group that ``state`` holds on one part (a balanced layer's input is not the tensor's grid);
    members that ``state`` does not hold so at the lead's width, and sites that do not lead, are dropped (and groups
    left with one)."""
    out = dict(state)
    kept = []
    for group in groups:
        placed = [r for r in group if _grid(state, r) is not None]
        if not placed:
            continue
        lead, bits, scale, zp = placed[0], *_grid(state, placed[0])
        members = [r for r in placed[1:] if state[r[0]].kind != "site" and _grid(state, r)[0] == bits]
        for name, side in members:
            s_field, z_field = _FIELDS[(out[name].kind, side)]
            out[name] = dataclasses.replace(out[name], **{s_field: scale.clone(), z_field: zp.clone()})
        if members:
            kept.append((lead, *members))
    return out, tuple(kept)


_ATTRS = {"in": "act", "out": "out", "a": "qa", "b": "qb"}


def tie_quantizers(model: nn.Module, groups: Iterable[Group]) -> int:
    """Make each group's members hold its lead's step and zero point (the same parameter and buffer objects), so
    that learning the step moves them all; returns the number of quantizers tied. The modules stay where they are
    (a site keeps its name). The groups are those :func:`share_qparams` returned for the state the model was built
    from."""
    owners = {**quant_layers(model), **quant_matmuls(model)}
    glue = quant_sites(model)

    def quantizer(role: Role) -> ActQuantizer:
        name, side = role
        q = glue.get(name) if side == "in" and name in glue else getattr(owners.get(name), _ATTRS[side], None)
        if q is None:
            raise KeyError(f"tie_quantizers: {name!r} has no quantized {side!r} in the model")
        return q

    tied = 0
    for lead, *members in groups:
        q = quantizer(lead)
        for role in members:
            m = quantizer(role)
            if not (torch.equal(m.scale, q.scale) and torch.equal(m.zero_point, q.zero_point)):
                raise ValueError(f"tie_quantizers: {role[0]!r} ({role[1]}) is not on {lead[0]!r}'s grid "
                                 "(share_qparams first)")
            m.scale, m.zero_point = q.scale, q.zero_point
            tied += 1
    return tied
