"""Settings whose value depends on the machine: the torch device and the width of 8-bit weight codes.

``quant.reduce_range: auto`` picks the integer weight codes that onnxruntime's CPU kernels compute exactly
on the machine that calibrates: on x86 CPUs without VNNI (AVX2, plain AVX-512) the u8s8 kernels add pairs
of u8 x s8 products in 16 bits, which saturates with full-range 8-bit weights, so 8-bit weights are stored
as 7-bit codes [-64, 63]; with VNNI (AVX512-VNNI, AVX-VNNI) or AMX the products accumulate in 32 bits and
full 8-bit codes are exact; ARM's int8 dot products accumulate in 32 bits too. ``true`` / ``false`` force
the choice (a deployment target other than the calibrating machine).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from pqd.errors import ParamError
from pqd.params.sections import Params

# /proc/cpuinfo flags of x86 CPUs whose int8 dot products accumulate in 32 bits
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i386", "i686")
_ARM = ("aarch64", "arm64")


def code_bits(bits: int, reduce_range: bool) -> int:
    """Width of the weight codes for ``bits``-bit weights: 7 for 8 with reduce_range (see :class:`IntegerCodes`)."""
    return 7 if bits == 8 and reduce_range else bits


@dataclass(frozen=True)
class IntegerCodes:
    """The resolved ``quant.reduce_range`` and why: recorded in the quantizer state, the export and the
    evaluation protocol, and behind the W7A8 / W8A8 labels."""

    reduce_range: bool  # 8-bit weights as 7-bit codes
    setting: str  # quant.reduce_range as written: 'auto', 'true' or 'false'
    machine: str  # platform.machine() of the calibrating machine
    cpu_flags: tuple[str, ...]  # the VNNI/AMX flags it has (x86 only)

    @property
    def reason(self) -> str:
        if self.setting != "auto":
            return f"quant.reduce_range = {self.setting}"
        if self.machine.lower() in _ARM:
            return f"auto: {self.machine} int8 kernels accumulate in 32 bits"
        if self.cpu_flags:
            return f"auto: this CPU has {', '.join(self.cpu_flags)}"
        if self.machine.lower() in _X86:
            return "auto: this x86 CPU has no VNNI/AMX (u8s8 kernels would saturate on full 8-bit codes)"
        return f"auto: unknown CPU architecture {self.machine!r} (7-bit codes are safe everywhere)"

    def as_dict(self) -> dict[str, object]:
        return {"reduce_range": self.reduce_range, "setting": self.setting, "machine": self.machine,
                "cpu_flags": list(self.cpu_flags), "reason": self.reason}


def cpu_vnni_flags(cpuinfo: str | None = None, wanted: tuple[str, ...] = VNNI_FLAGS) -> tuple[str, ...]:
    """The VNNI/AMX flags of this CPU (from /proc/cpuinfo; ``cpuinfo`` gives its text instead), in VNNI_FLAGS order
    (``wanted``: other flags to look for, in their order)."""
    if cpuinfo is None:
        f = Path("/proc/cpuinfo")
        cpuinfo = f.read_text(errors="replace") if f.is_file() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[-1].split())
    return tuple(f for f in wanted if f in flags)


def saturates_full_range(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """Whether onnxruntime's int8 kernels on this CPU can saturate on full-range 8-bit weight codes (x86 without
    VNNI/AMX, or an architecture we do not know)."""
    machine = machine or platform.machine()
    return not (machine.lower() in _ARM or (machine.lower() in _X86 and bool(cpu_vnni_flags(cpuinfo))))


def integer_codes(p: Params, machine: str | None = None, cpuinfo: str | None = None) -> IntegerCodes:
    """``quant.reduce_range`` resolved for this machine (``machine`` / ``cpuinfo`` stand in for it in tests)."""
    machine = machine or platform.machine()
    flags = cpu_vnni_flags(cpuinfo) if machine.lower() in _X86 else ()
    setting = p.quant.reduce_range
    if setting == "auto":
        return IntegerCodes(saturates_full_range(machine, cpuinfo), "auto", machine, flags)
    return IntegerCodes(bool(setting), str(setting).lower(), machine, flags)


def resolve_device(p: Params) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without a GPU is an error (checked before the first stage by
    :func:`pqd.params.load.check_params_file`, and again by each stage that uses the device)."""
    import torch  # this module is imported by params, which stays free of torch until a device is needed

    if p.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if p.device == "cuda" and not torch.cuda.is_available():
        raise ParamError("params: device = 'cuda' is not allowed here: torch.cuda.is_available() is False on this "
                         "machine; expected 'cpu' or 'auto' (the GPU when there is one)")
    return p.device
