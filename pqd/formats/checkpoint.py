"""Calibration checkpoints: the fitted quantizers and each finished reconstruction unit kept outside the stage's
outputs, so a killed calibrate stage resumes from the last finished unit (``checkpoint.*``, docs/scaling.md).

A checkpoint folder is content-addressed like DVC's cache: its name is a hash of everything that determines the
units' results (the model and calibration files, the params the stage reads, the resolved integer codes, the
device and torch thread count, torch's version and the pqd source code), so a changed input never resumes from
a stale unit. One safetensors file per unit holds its quantized state and, in its metadata, its log entry; each
is written under a temporary name and renamed, so a kill leaves no partial unit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pqd
from pqd.core.quantize import QState
from pqd.core.reconstruct import UnitResult
from pqd.core.timegroups import TimeGroups
from pqd.formats import qstate as qcodec
from pqd.formats.files import atomic_dir
from pqd.formats.lineage import canonical_json, hash_tree

KEY_FILE = "key.json"
FIT = "fit"  # the quantizers as fitted, before reconstruction


def calibrate_key(model: Path, calib: Path, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The checkpoint key of a calibrate run and what it was computed from (written beside the units)."""
    code = hash_tree(Path(pqd.__file__).parent)
    what = {"model": hash_tree(model), "calib": hash_tree(calib), "settings": settings,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "code": {k: v for k, v in code.items() if k.endswith(".py")}}
    return hashlib.sha256(canonical_json(what).encode()).hexdigest()[:32], what


class UnitCheckpoint:
    """The finished units of one calibrate run, in ``root/calibrate-<key>``."""

    def __init__(self, root: Path, key: str, what: dict[str, Any]) -> None:
        self.root, self.folder = Path(root), Path(root) / f"calibrate-{key}"
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / KEY_FILE).is_file():
            (self.folder / KEY_FILE).write_text(json.dumps(what, indent=1, sort_keys=True) + "\n")
        os.utime(self.folder)  # the most recently used checkpoint is pruned last

    def _file(self, unit: str) -> Path:
        return self.folder / f"{unit or '_model'}.safetensors"

    def units(self) -> list[str]:
        """Reconstruction units finished so far (by file name)."""
        return sorted(p.name[: -len(".safetensors")] for p in self.folder.glob("*.safetensors"))

    def load(self, unit: str) -> UnitResult | None:
        f = self._file(unit)
        if not f.is_file():
            return None
        with safe_open(str(f), framework="pt") as h:
            state = {k: h.get_tensor(k) for k in h.keys()}
            entry = json.loads((h.metadata() or {})["entry"])
        return state, entry

    def save(self, unit: str, result: UnitResult) -> None:
        state, entry = result
        f = self._file(unit)
        tmp = f.with_name(f".{f.name}.tmp-{uuid.uuid4().hex[:8]}")
        # one file tensor per key: quantizers sharing one grid (quant.share_grids) hold the same tensor
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"entry": json.dumps(entry)})
        os.replace(tmp, f)

    def fitted(self, groups: TimeGroups) -> Callable[[Callable[[], QState]], QState]:
        """``calibrate_network``'s ``fitted``: the quantizers fitted by an earlier run of this checkpoint, or
        ``fit()``'s, kept here (in the qstate codec) for the next run."""
        folder = self.folder / FIT

        def fitted(fit: Callable[[], QState]) -> QState:
            if (folder / qcodec.QMAP).is_file():
                print(f"pqd calibrate: fitted quantizers from the checkpoint {self.folder}", flush=True)
                return qcodec.read(folder, qcodec.STATE_TENSORS)[0]
            state = fit()
            with atomic_dir(folder) as tmp:
                qcodec.write(tmp, qcodec.STATE_TENSORS, state, groups)
            return state

        return fitted

    def close(self, keep_mb: int) -> None:
        """After a completed stage: with ``keep_mb`` 0 remove this checkpoint; otherwise remove the least recently
        used checkpoints under the root until the rest fit in ``keep_mb``."""
        if keep_mb == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        folders = sorted((p for p in self.root.glob("calibrate-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folders}
        total = sum(sizes.values())
        for p in folders:
            if total <= keep_mb * 2**20:
                break
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]
