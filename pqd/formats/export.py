"""The export folder: a pipeline folder whose denoiser is quantized, sealed by a manifest, and its loader.

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

``load_quantized_unet`` rebuilds the quantized denoiser from the folder alone, refusing any file whose
hash disagrees with the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.core.quantize import apply_qstate, QState
from pqd.core.timegroups import set_time_group, TimeGroups
from pqd.core.quantize import MatMulQParams, SiteQParams, weight_layers
from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.diffusion.attention import use_matmul_attention
from pqd.diffusion.glue import install_sites
from pqd.diffusion.digits import FEATURES_DIR
from pqd.diffusion.pipeline import denoiser_component, denoiser_from_config
from pqd.diffusion.pipeline import load_pipeline as load_pipeline_folder
from pqd.errors import ArtifactError
from pqd.formats import qstate as qcodec
from pqd.formats.files import read_json, write_json
from pqd.formats.lineage import MODEL_RECORD, hash_tree, sha256_file

FORMAT_VERSION = qcodec.FORMAT_VERSION
QWEIGHTS = "unet/quantized.safetensors"  # a UNet's; see quantized_weights_file
QUANTIZED = "quantized.safetensors"  # inside the denoiser's component folder
MANIFEST = "manifest.json"  # sha256 of every other file of the export, source model hash, params, git commit
_SKIP_FROM_MODEL = (MODEL_RECORD,)


def quantized_weights_file(folder: Path) -> Path:
    """``<d>/quantized.safetensors`` of an export folder (``<d>``: unet or transformer)."""
    return Path(folder) / denoiser_component(folder) / QUANTIZED


def write_export(model_dir: Path, unet: nn.Module, state: QState, groups: TimeGroups, out: Path, *,
                 float_dtype: torch.dtype) -> dict[str, Any]:
    """Write the export folder ``out`` (already created, empty) for the float denoiser ``unet`` quantized by
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
              for k, v in unet.state_dict().items() if k not in quantized_weights}
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


def time_groups_of(export_dir: Path) -> TimeGroups:
    return qcodec.time_groups(qcodec.read_qmap(export_dir))


def load_quantized_unet(export_dir: str | Path, device: str = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild the quantized denoiser (UNet or transformer) from an export folder alone (float32 compute,
    integer weights).

    Time-aware activation parameters come with it; select the group with ``set_time_group`` or sample
    through :func:`load_denoiser_from_export`, which does it from the timestep."""
    export_dir = Path(export_dir)
    if verify:
        verify_manifest(export_dir)
    component = denoiser_component(export_dir)
    weights = f"{component}/{QUANTIZED}"
    state, _, floats, _ = qcodec.read(export_dir, weights)
    unet = denoiser_from_config(read_json(export_dir / component / "config.json"))
    missing, unexpected = unet.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                                for k, v in floats.items()}, strict=False)
    expected_missing = {f"{n}.weight" for n in weight_layers(state)}
    if unexpected or set(missing) != expected_missing:
        extra = sorted(set(missing) - expected_missing)[:1] or sorted(unexpected)[:1]
        raise ArtifactError(f"{export_dir}/{weights}: tensors do not match the {component} config (first mismatch: "
                            f"{extra})")
    if any(isinstance(lp, MatMulQParams) for lp in state.values()):  # quantized attention matmuls
        use_matmul_attention(unet)
    install_sites(unet, [n for n, lp in state.items() if isinstance(lp, SiteQParams)])  # quant.glue
    apply_qstate(unet, state)
    return unet.to(device).eval().requires_grad_(False)


def load_denoiser_from_export(export_dir: str | Path, device: str = "cpu") -> Denoiser:
    """A Denoiser around the quantized network, with every other pipeline component (scheduler config, and the
    float autoencoder / text encoders of latent and text models) loaded from the export folder."""
    export_dir = Path(export_dir)
    den = load_denoiser(export_dir, device, unet=load_quantized_unet(export_dir, device))
    den.time_groups = time_groups_of(export_dir)
    return den


def select_group_by_timestep(unet: nn.Module, groups: TimeGroups) -> None:
    """Make ``unet(sample, timestep, ...)`` pick the time group's activation parameters from the timestep itself,
    so code that knows nothing about time groups (a diffusers pipeline's ``__call__``) samples correctly."""
    if groups.count == 1:
        return

    def pick(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        present = groups.group_of(torch.as_tensor(t).detach().float().cpu()).unique()
        if len(present) != 1:
            raise ValueError(f"a batch with timesteps from {len(present)} time groups: call the UNet once per group "
                             "(pqd's Denoiser.predict splits such batches)")
        set_time_group(module, int(present[0]))

    unet.register_forward_pre_hook(pick, with_kwargs=True)


def load_pipeline(export_dir: str | Path, device: str = "cpu"):
    """The export as a diffusers ``DiffusionPipeline`` whose UNet (transformer) is the quantized one: ``pipe(...)``
    samples with the calibrated integer weights and time-aware activation parameters. Every file is verified
    first. (A pixel-space DiT pipeline, like the DiT demo's, has no autoencoder: its own ``__call__`` cannot
    decode; sample it with :class:`pqd.ops.serving.Sampler`.)"""
    export_dir = Path(export_dir)
    unet = load_quantized_unet(export_dir, device)
    select_group_by_timestep(unet, time_groups_of(export_dir))
    return load_pipeline_folder(export_dir, device, unet)
