"""Orthogonal rotations folded into attention's weights where the network computes the same function after them
(``quant.rotate``).

Within one attention head, the value projection's outputs reach nothing but the softmax-weighted sum and the
output projection. Rotating them by an orthogonal R per head (``v' = v R``, so ``W_v' = Rᵀ W_v`` and
``b_v' = Rᵀ b_v``) and counter-rotating the output projection's input columns of that head (``W_o' = W_o R``)
changes nothing in float arithmetic: ``(A v R) Rᵀ W_oᵀ = A v W_oᵀ``. What changes is what gets quantized: a Hadamard
R spreads an outlier over the head's channels, so the output projection's weight rows and its input activations
have a smaller peak against their spread (QuaRot), and the value projection's rows within a head are mixed to equal
norms.

Exact, so no online rotation is needed. Attention modules whose value path does something else (joint attention
with a second stream's values, grouped key/value heads, a fused QKV projection) are left as they are and named.
Pure torch, no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

ROTATIONS = ("none", "hadamard")


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix scaled to be orthogonal (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: size {n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix drawn from ``seed`` (QR of a Gaussian, signs fixed)."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def head_rotation(head_dim: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The rotation of one head: Hadamard for a power-of-two width; otherwise the Kronecker product of the largest
    power-of-two Hadamard that divides it and a random orthogonal block (a head width of 24: H_8 x Q_3)."""
    p = head_dim & -head_dim  # the largest power of two dividing head_dim
    if p == head_dim:
        return hadamard(head_dim), "hadamard"
    q = random_orthogonal(head_dim // p, seed)
    if p == 1:
        return q, f"orthogonal {head_dim}"
    return torch.kron(hadamard(p), q), f"hadamard {p} x orthogonal {head_dim // p}"


@dataclass
class RotationReport:
    """What :func:`rotate_attention` did: the modules rotated (name -> rotation kind), the linears each rotation
    changed (name -> (value projection, output projection), full names in the network) and the modules left
    (name -> why)."""

    rotated: dict[str, str] = field(default_factory=dict)
    linears: dict[str, tuple[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"rotated": len(self.rotated), "kinds": sorted(set(self.rotated.values())), "skipped": self.skipped}


def _value_path(attn: nn.Module) -> tuple[nn.Linear, nn.Linear, int] | str:
    """(value projection, output projection, heads) of a diffusers-style attention module, or why it is not one
    whose value path can be rotated exactly."""
    if getattr(attn, "add_v_proj", None) is not None:
        return "joint attention: a second stream's values share the softmax"
    to_v, to_out = getattr(attn, "to_v", None), getattr(attn, "to_out", None)
    out = to_out[0] if isinstance(to_out, (nn.ModuleList, nn.Sequential)) and len(to_out) else to_out
    if not isinstance(to_v, nn.Linear) or not isinstance(out, nn.Linear):
        return "no separate value and output linears"
    heads = int(getattr(attn, "heads", 0) or 0)
    if heads < 1 or to_v.out_features % heads or out.in_features != to_v.out_features:
        return f"{to_v.out_features} value channels, {out.in_features} output-projection inputs, {heads} heads"
    return to_v, out, heads


def _names_within(prefix: str, parent: nn.Module, *modules: nn.Module) -> tuple[str, ...]:
    """The full names of ``modules`` (submodules of ``parent``, itself named ``prefix`` in the network)."""
    within = {id(m): n for n, m in parent.named_modules()}
    return tuple(".".join(p for p in (prefix, within[id(m)]) if p) for m in modules)


def attention_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with a value projection ``to_v`` (diffusers' ``Attention`` and look-alikes), in module order."""
    return [(n, m) for n, m in net.named_modules() if isinstance(getattr(m, "to_v", None), nn.Module)]


@torch.no_grad()
def rotate_attention(net: nn.Module, kind: str, seed: int = 0) -> RotationReport:
    """Fold a per-head rotation into the value and output projections of every attention module of ``net`` (in
    place); ``kind`` one of :data:`ROTATIONS` ('none' does nothing)."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation {kind!r} is not allowed: expected one of {', '.join(ROTATIONS)}")
    report = RotationReport()
    if kind == "none":
        return report
    for name, attn in attention_modules(net):
        path = _value_path(attn)
        if isinstance(path, str):
            report.skipped[name] = path
            continue
        to_v, out, heads = path
        d = to_v.out_features // heads
        r, what = head_rotation(d, seed)
        big = torch.block_diag(*[r] * heads)  # [inner, inner]
        wv = to_v.weight.double()
        to_v.weight.copy_((big.T @ wv).to(to_v.weight.dtype))
        if to_v.bias is not None:
            to_v.bias.copy_((big.T @ to_v.bias.double()).to(to_v.bias.dtype))
        out.weight.copy_((out.weight.double() @ big).to(out.weight.dtype))
        report.rotated[name] = what
        report.linears[name] = _names_within(name, attn, to_v, out)
    return report
