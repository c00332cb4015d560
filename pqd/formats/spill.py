"""Reconstruction recordings kept on disk: one file per calibration batch, read back when used.

A unit's inputs and FP outputs over a large calibration set can be gigabytes (a CIFAR-10 DDPM up-block ResNet:
~2 MB per sample), so units whose recordings would exceed ``calibrate.memory_mb`` keep them in files, removed as
soon as the unit is done.
"""

from __future__ import annotations

import itertools
import shutil
import weakref
from collections.abc import MutableSequence
from pathlib import Path
from typing import Any

import torch

from pqd.core.reconstruct import StoreFactory


class DiskList(MutableSequence):
    """An append-only list whose items (tensors, tuples and dicts of tensors) live in files of ``folder``;
    the folder is deleted when the list is garbage-collected."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        self._n = 0
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if not 0 <= i < self._n:
            raise IndexError(i)
        return torch.load(self.folder / f"{i:06d}.pt", weights_only=True)  # tensors, tuples, dicts, numbers only

    def insert(self, i: int, item: Any) -> None:
        if i != self._n:
            raise NotImplementedError("DiskList only appends")
        torch.save(item, self.folder / f"{i:06d}.pt")
        self._n += 1

    def __setitem__(self, i: int, item: Any) -> None:  # type: ignore[override]
        raise NotImplementedError("DiskList only appends")

    def __delitem__(self, i: int) -> None:  # type: ignore[override]
        raise NotImplementedError("DiskList only appends")


def store_factory(folder: Path, unit_bytes: dict[str, int], budget_bytes: int) -> StoreFactory:
    """Recordings of units whose estimated size (``unit_bytes``) exceeds ``budget_bytes`` go to DiskLists
    under ``folder``; the others stay in memory."""
    counter = itertools.count()

    def make(unit: str, kind: str) -> MutableSequence:
        if unit_bytes.get(unit, 0) <= budget_bytes:
            return []
        return DiskList(Path(folder) / f"{next(counter):05d}-{unit}-{kind}")

    return make
