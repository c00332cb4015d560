"""Observers: record statistics of layer inputs during calibration; compute quantizer parameters later."""

from __future__ import annotations

import torch

from pqd.core.affine import act_qparams
from pqd.core.qtypes import QType


class ActObserver:
    """Tracks the running min/max of the inputs it sees and keeps a bounded random sample of them (at most
    ``max_samples`` values, seeded) for the MSE range search; ``qparams`` gives float32 scalars (scale, zero_point)."""

    def __init__(self, max_samples: int = 200_000, per_update: int = 4096, seed: int = 0) -> None:
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))
        self.max_samples = max_samples
        self.per_update = per_update
        self._gen = torch.Generator().manual_seed(seed)
        self._chunks: list[torch.Tensor] = []
        self._count = 0

    @property
    def seen(self) -> bool:
        return bool(torch.isfinite(self.lo))

    def update(self, x: torch.Tensor) -> None:
        # reduced and subsampled where x lives: only two scalars and the sample reach the host
        x = x.detach().reshape(-1)
        if x.numel() == 0:
            return
        # NaN propagates into both; float32 rounding is monotonic, so min/max then cast = cast then min/max
        lo, hi = x.min().to(torch.float32).cpu(), x.max().to(torch.float32).cpu()
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise FloatingPointError(f"non-finite values (min {float(lo)}, max {float(hi)})")
        self.lo = torch.minimum(self.lo, lo)
        self.hi = torch.maximum(self.hi, hi)
        k = min(self.per_update, x.numel())
        idx = torch.randint(0, x.numel(), (k,), generator=self._gen)  # on the host generator: same draws anywhere
        self._chunks.append(x[idx.to(x.device)].to(torch.float32).cpu())
        self._count += k
        if self._count > 2 * self.max_samples:  # keep memory bounded: thin to max_samples
            allv = torch.cat(self._chunks)
            keep = torch.randperm(allv.numel(), generator=self._gen)[: self.max_samples]
            self._chunks, self._count = [allv[keep]], self.max_samples

    def qparams(self, qtype: QType, method: str, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.seen:
            raise RuntimeError("ActObserver.qparams: the observer saw no data")
        values = torch.cat(self._chunks)
        return act_qparams(values, self.lo, self.hi, qtype, method, symmetric=symmetric)
