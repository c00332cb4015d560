"""The export format: integer weights + scales in safetensors, qmap.json, manifest.json, and its loader.

Layout of an export folder (format_version 1)::

    model_index.json, scheduler/ ...   every pipeline component but the UNet's weights, copied
    unet/config.json                   the UNet's config (rebuilds the architecture)
    unet/quantized.safetensors         per quantized layer L: L.qweight (int8 codes, or uint8 with two
                                       4-bit codes per byte when weight_bits <= 4), L.weight_scale
                                       (float32 [out]), L.act_scale / L.act_zero_point (float32 [G, P]:
                                       G time groups, P = 2 when the input is split in two parts);
                                       L.out_scale / L.out_zero_point (same shapes) for layers whose
                                       output is quantized; every other UNet tensor in float
    onnx/unet.g<g>.onnx, onnx/weights.bin  the deployable graphs (one per time group, sharing the
                                       int8 weights), see pqd.deploy; absent when not exported
                                       L.a_scale / L.a_zero_point / L.b_scale / L.b_zero_point
                                       ([G, 1]) for each quantized attention matmul L (Q·Kᵀ, softmax·V)
    qmap.json                          format_version, the time-group thresholds and, per layer, bits,
                                       granularity, storage, shape, input split (kind "matmul": the
                                       operands' bits)
    manifest.json                      sha256 of every other file, source model hash, params, git commit

``load_quantized_unet`` rebuilds the quantized UNet from the folder alone, refusing any file whose
hash disagrees with the manifest.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from pqd.core import LayerQParams, QState, TimeGroups, apply_qstate, pack_int4, set_time_group, unpack_int4
from pqd.core.quantize import MatMulQParams, weight_layers
from pqd.diffusion.adapter import Denoiser, load_denoiser, unet_from_config
from pqd.diffusion.attention import use_matmul_attention
from pqd.io import hash_tree, load_tensors, read_json, sha256_file, write_json

FORMAT_VERSION = 1
QWEIGHTS = "unet/quantized.safetensors"
_SKIP_FROM_MODEL = ("model.json",)


class ArtifactError(ValueError):
    """An export folder that cannot be trusted or read."""


def git_commit(cwd: Path | None = None) -> dict[str, Any]:
    """The current git commit and whether the work tree has uncommitted changes (None outside git)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": rev, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _storage(bits: int) -> str:
    return "int4_packed" if bits <= 4 else "int8"


def write_export(model_dir: Path, unet: nn.Module, state: QState, groups: TimeGroups, out: Path, *,
                 float_dtype: torch.dtype) -> dict[str, Any]:
    """Write the export folder ``out`` (already created, empty) for the float ``unet`` quantized by ``state``
    (everything but the manifest: see :func:`write_manifest`)."""
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir)
        if p.is_dir() or rel.parts[0] in ("unet", "fid_features") or rel.as_posix() in _SKIP_FROM_MODEL:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, out / rel)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_dir / "unet" / "config.json", out / "unet" / "config.json")

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, lp in state.items():
        if isinstance(lp, MatMulQParams):
            for k in MatMulQParams.TENSORS:
                tensors[f"{name}.{k}"] = getattr(lp, k).to(torch.float32).contiguous()
            layers[name] = {"kind": "matmul", "a_bits": lp.a_bits, "b_bits": lp.b_bits, "act_granularity": "per_tensor",
                            "act_symmetric": False, "act_time_groups": int(lp.a_scale.shape[0])}
            continue
        codes = lp.weight_int.to(torch.int8)
        tensors[f"{name}.qweight"] = pack_int4(codes) if lp.weight_bits <= 4 else codes.contiguous()
        tensors[f"{name}.weight_scale"] = lp.weight_scale.to(torch.float32).contiguous()
        tensors[f"{name}.act_scale"] = lp.act_scale.to(torch.float32).contiguous()
        tensors[f"{name}.act_zero_point"] = lp.act_zero_point.to(torch.float32).contiguous()
        if lp.out_scale is not None:
            tensors[f"{name}.out_scale"] = lp.out_scale.to(torch.float32).contiguous()
            tensors[f"{name}.out_zero_point"] = lp.out_zero_point.to(torch.float32).contiguous()
        layers[name] = {"kind": lp.kind, "shape": list(codes.shape), "weight_bits": lp.weight_bits,
                        "weight_granularity": "per_output_channel", "weight_symmetric": True,
                        "weight_storage": _storage(lp.weight_bits), "act_bits": lp.act_bits,
                        "act_granularity": "per_tensor", "act_symmetric": False,
                        "act_time_groups": int(lp.act_scale.shape[0]), "act_split": lp.act_split,
                        "output_quantized": lp.out_scale is not None}
    quantized_weights = {f"{n}.weight" for n in weight_layers(state)}
    for key, value in unet.state_dict().items():
        if key not in quantized_weights:
            tensors[key] = value.detach().to(float_dtype if value.is_floating_point() else value.dtype).contiguous()
    save_file(tensors, out / QWEIGHTS)
    write_json(out / "qmap.json", {"format_version": FORMAT_VERSION, "float_dtype": str(float_dtype).replace("torch.", ""),
                                   "time_groups": {"count": groups.count, "thresholds": list(groups.thresholds)},
                                   "layers": layers})
    return {"quantized_layers": len(layers)}


def write_manifest(out: Path, manifest_extra: dict[str, Any]) -> int:
    """Seal the export folder: manifest.json with the sha256 of every other file; returns the file count."""
    files = hash_tree(out)
    write_json(out / "manifest.json", {"format_version": FORMAT_VERSION, "files": files, **manifest_extra})
    return len(files) + 1


def verify_manifest(export_dir: Path) -> dict[str, Any]:
    """Check every file listed in manifest.json against its sha256, and that no other file is there (nothing
    unverified can be loaded from the folder); returns the manifest."""
    export_dir = Path(export_dir)
    if not (export_dir / "manifest.json").is_file():
        raise ArtifactError(f"{export_dir}: manifest.json is missing: not a PQD export folder")
    manifest = read_json(export_dir / "manifest.json")
    listed = set(manifest.get("files", {})) | {"manifest.json"}
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


def read_qstate(export_dir: Path) -> tuple[QState, dict[str, torch.Tensor], dict[str, Any]]:
    """(quantizer state, remaining float tensors, qmap) from an export folder (no hash check)."""
    qmap = read_json(export_dir / "qmap.json")
    if qmap.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{export_dir}/qmap.json: format_version = {qmap.get('format_version')!r} is not "
                            f"supported: expected {FORMAT_VERSION}")
    tensors = load_tensors(export_dir / QWEIGHTS)
    state: QState = {}
    for name, info in qmap["layers"].items():
        try:
            if info["kind"] == "matmul":
                state[name] = MatMulQParams(int(info["a_bits"]), int(info["b_bits"]),
                                            *(tensors.pop(f"{name}.{k}") for k in MatMulQParams.TENSORS))
                continue
            raw = tensors.pop(f"{name}.qweight")
            shape = tuple(info["shape"])
            numel = int(torch.Size(shape).numel())
            codes = unpack_int4(raw, numel).reshape(shape) if info["weight_storage"] == "int4_packed" else raw.reshape(shape)
            state[name] = LayerQParams(kind=info["kind"], weight_bits=int(info["weight_bits"]), act_bits=int(info["act_bits"]),
                                       act_split=info.get("act_split"),
                                       weight_int=codes.to(torch.int8), weight_scale=tensors.pop(f"{name}.weight_scale"),
                                       act_scale=tensors.pop(f"{name}.act_scale"),
                                       act_zero_point=tensors.pop(f"{name}.act_zero_point"),
                                       **({"out_scale": tensors.pop(f"{name}.out_scale"),
                                           "out_zero_point": tensors.pop(f"{name}.out_zero_point")}
                                          if info.get("output_quantized") else {}))
        except KeyError as e:
            raise ArtifactError(f"{export_dir}/{QWEIGHTS}: tensor {e.args[0]} for layer {name} is missing") from None
    return state, tensors, qmap


def time_groups_of(export_dir: Path) -> TimeGroups:
    return TimeGroups(tuple(read_json(Path(export_dir) / "qmap.json").get("time_groups", {}).get("thresholds", [])))


def load_quantized_unet(export_dir: str | Path, device: str = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild the quantized UNet from an export folder alone (float32 compute, integer weights).

    Time-aware activation parameters come with it; select the group with ``set_time_group`` or sample
    through :func:`load_denoiser_from_export`, which does it from the timestep."""
    export_dir = Path(export_dir)
    if verify:
        verify_manifest(export_dir)
    state, floats, _ = read_qstate(export_dir)
    unet = unet_from_config(read_json(export_dir / "unet" / "config.json"))
    missing, unexpected = unet.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                                for k, v in floats.items()}, strict=False)
    expected_missing = {f"{n}.weight" for n in weight_layers(state)}
    if unexpected or set(missing) != expected_missing:
        extra = sorted(set(missing) - expected_missing)[:1] or sorted(unexpected)[:1]
        raise ArtifactError(f"{export_dir}/{QWEIGHTS}: tensors do not match the UNet config (first mismatch: {extra})")
    if any(isinstance(lp, MatMulQParams) for lp in state.values()):  # quantized attention matmuls
        use_matmul_attention(unet)
    apply_qstate(unet, state)
    return unet.to(device).eval().requires_grad_(False)


def load_denoiser_from_export(export_dir: str | Path, device: str = "cpu") -> Denoiser:
    """A Denoiser around the quantized UNet, with every other pipeline component (scheduler config, and the
    float autoencoder / text encoder of latent and text models) loaded from the export folder."""
    export_dir = Path(export_dir)
    den = load_denoiser(export_dir, device, unet=load_quantized_unet(export_dir, device))
    den.time_groups = time_groups_of(export_dir)
    return den


def select_group_by_timestep(unet: nn.Module, groups: TimeGroups) -> None:
    """Make ``unet(sample, timestep)`` pick the time group's activation parameters from the timestep itself,
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
    """The export as a diffusers ``DiffusionPipeline`` whose UNet is the quantized one: ``pipe(...)`` samples
    with the calibrated integer weights and time-aware activation parameters. Every file is verified first."""
    from diffusers import DiffusionPipeline

    export_dir = Path(export_dir)
    unet = load_quantized_unet(export_dir, device)
    select_group_by_timestep(unet, time_groups_of(export_dir))
    pipe = DiffusionPipeline.from_pretrained(str(export_dir), unet=unet, dtype=torch.float32)
    return pipe.to(device)
