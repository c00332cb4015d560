"""The export folder: a pipeline folder whose denoiser is quantized, sealed by a manifest.

Layout (format_version 1); ``<d>`` is the denoiser's component, ``unet`` or ``transformer``::

    model_index.json, scheduler/ ...   every pipeline component but the denoiser's weights, copied
    <d>/config.json                    the denoiser's config (rebuilds the architecture)
    <d>/quantized.safetensors          the quantizer state's tensors (pqd.formats.qstate) and every other
                                       tensor of the denoiser in float (``export.float_dtype``)
    qmap.json                          format_version, float_dtype, the time-group thresholds and, per
                                       layer, bits, granularity, storage, shape, input split (pqd.formats.qstate)
    onnx/unet.g<g>.onnx, onnx/weights.bin  the deployable graphs (one per time group, sharing the int8
                                       weights), see pqd.deploy; absent when not exported
    manifest.json                      sha256 of every other file, source model hash, params, git commit

The loaders (the quantized network, a Denoiser, the diffusers pipeline) are in :mod:`pqd.diffusion.quantized`;
they rebuild the quantized denoiser from the folder alone, refusing any file whose hash disagrees with the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.core.quantize import QState, weight_layers
from pqd.core.timegroups import TimeGroups
from pqd.errors import ArtifactError
from pqd.formats import qstate as qcodec
from pqd.formats.files import read_json, write_json
from pqd.formats.lineage import MODEL_RECORD, hash_tree, sha256_file
from pqd.formats.pipefolder import FEATURES_DIR, denoiser_component

FORMAT_VERSION = qcodec.FORMAT_VERSION
QUANTIZED = "quantized.safetensors"  # inside the denoiser's component folder
MANIFEST = "manifest.json"  # sha256 of every other file of the export, source model hash, params, git commit
_SKIP_FROM_MODEL = (MODEL_RECORD,)


def quantized_weights_file(folder: Path) -> Path:
    """``<d>/quantized.safetensors`` of an export folder (``<d>``: unet or transformer)."""
    return Path(folder) / denoiser_component(folder) / QUANTIZED


def write_export(model_dir: Path, net: nn.Module, state: QState, groups: TimeGroups, out: Path, *,
                 float_dtype: torch.dtype) -> dict[str, Any]:
    """Write the export folder ``out`` (already created, empty) for the float denoiser ``net`` quantized by
    ``state`` (everything but the manifest: see :func:`write_manifest`)."""
    component = denoiser_component(model_dir)
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir)
        if p.is_dir() or rel.parts[0] in (component, FEATURES_DIR) or rel.as_posix() in _SKIP_FROM_MODEL:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, out / rel)
    (out / component).mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_dir / component / "config.json", out / component / "config.json")
    quantized_weights = {f"{n}.weight" for n in weight_layers(state)}
    floats = {k: v.detach().to(float_dtype if v.is_floating_point() else v.dtype).contiguous()
              for k, v in net.state_dict().items() if k not in quantized_weights}
    layers = qcodec.write(out, f"{component}/{QUANTIZED}", state, groups, extra_tensors=floats,
                          header={"float_dtype": str(float_dtype).replace("torch.", "")})
    return {"quantized_layers": len(layers)}


def write_manifest(out: Path, manifest_extra: dict[str, Any]) -> int:
    """Seal the export folder: manifest.json with the sha256 of every other file; returns the file count."""
    files = hash_tree(out)
    write_json(out / MANIFEST, {"format_version": FORMAT_VERSION, "files": files, **manifest_extra})
    return len(files) + 1


def verify_manifest(export_dir: Path) -> dict[str, Any]:
    """Check every file listed in manifest.json against its sha256, and that no other file is there (nothing
    unverified can be loaded from the folder); returns the manifest."""
    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST).is_file():
        raise ArtifactError(f"{export_dir}: manifest.json is missing: not a PQD export folder")
    manifest = read_json(export_dir / MANIFEST)
    listed = set(manifest.get("files", {})) | {MANIFEST}
    unlisted = sorted(rel for p in export_dir.rglob("*") if p.is_file() and (rel := p.relative_to(export_dir).as_posix())
                      not in listed)
    if unlisted:
        raise ArtifactError(f"{export_dir}: file {unlisted[0]} is not listed in manifest.json: expected only the files "
                            "the export stage wrote")
    for rel, digest in manifest.get("files", {}).items():
        p = export_dir / rel
        if not p.is_file():
            raise ArtifactError(f"{export_dir}: file {rel} listed in manifest.json is missing")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{export_dir}: file {rel} was modified (sha256 differs from manifest.json)")
    return manifest


def evaluated_backend(manifest: dict[str, Any]) -> str:
    """The ``evaluate.backend`` an export was made for (its manifest's params): the runtime that ships it, or torch.
    Manifests without it (older exports) are onnxruntime's, the default then."""
    return manifest.get("params", {}).get("evaluate", {}).get("backend") or "onnxruntime"


def time_groups_of(export_dir: Path) -> TimeGroups:
    return qcodec.time_groups(qcodec.read_qmap(export_dir))
