"""Integer storage: signed 4-bit (or narrower) codes packed two per byte."""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed codes in [-8, 7] (any shape, any integer dtype) into flat uint8 [ceil(numel / 2)]: element 2i in
    the low nibble of byte i, element 2i+1 in the high nibble, an odd count padded with a zero code."""
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"pack_int4: codes must lie in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = flat & 0xF  # two's complement nibble
    return (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: flat uint8 -> flat int8 of length ``numel`` (sign-extended)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected uint8 storage, got {packed.dtype}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"unpack_int4: {packed.numel()} bytes cannot hold {numel} codes")
    p = packed.to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=1).reshape(-1)[:numel]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
