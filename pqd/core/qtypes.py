"""Integer types as small value objects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QType:
    """An integer grid: ``bits`` wide, signed (two's complement range) or unsigned."""

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"QType.bits = {self.bits} is not allowed: expected an integer in [2, 16]")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


def weight_qtype(bits: int) -> QType:
    """Weights: symmetric, signed (int8 / int4 ...), stored as int8 codes: at most 8 bits."""
    if bits > 8:
        raise ValueError(f"weight bits = {bits} is not allowed: expected an integer in [2, 8] (int8 storage)")
    return QType(bits, signed=True)


def act_qtype(bits: int) -> QType:
    """Activations: asymmetric, unsigned with a zero point (uint8 ...)."""
    return QType(bits, signed=False)
