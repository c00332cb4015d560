"""The one codec of a :class:`~pqd.core.QState` on disk: ``qmap.json`` + a safetensors file, the same map and
tensor names in the calibrate stage's ``qstate/`` and in ``export/`` (which stores the network's float tensors
beside them).

- ``qmap.json``: ``format_version``, the time groups (count and thresholds) and, per entry, its kind and bits
  (layers also granularity, storage, shape, input split, whether the output is quantized), plus what the writer adds;
- the tensors, per weight layer L: ``L.qweight`` (int8 codes, or uint8 with two 4-bit codes per byte when
  weight_bits <= 4) and the fields of :class:`~pqd.core.quantize.LayerQParams` (``L.out_*`` only when the output is
  quantized, ``L.smooth`` only when balanced); per matmul M and glue site S the fields of their QParams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from pqd.core.affine import group_width
from pqd.core.packing import pack_int4, unpack_int4
from pqd.core.quantize import LayerQParams, MatMulQParams, QState, SiteQParams
from pqd.core.timegroups import TimeGroups
from pqd.errors import ArtifactError
from pqd.formats.files import load_tensors, read_json, write_json

FORMAT_VERSION = 1
QMAP = "qmap.json"
STATE_TENSORS = "quantized.safetensors"  # the calibrate stage's qstate/ folder (an export has its own name)
_LAYER_TENSORS = ("weight_scale", "act_scale", "act_zero_point")
_OUT_TENSORS = ("out_scale", "out_zero_point")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _granularity(lp: LayerQParams) -> dict[str, Any]:
    if lp.weight_scale.ndim == 1:
        return {"weight_granularity": "per_output_channel"}
    groups = int(lp.weight_scale.shape[1])
    return {"weight_granularity": "per_group", "weight_groups": groups,
            "weight_group_width": group_width(int(lp.weight_int.shape[1]), groups)}


def _encode_layer(name: str, lp: LayerQParams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    codes = lp.weight_int.to(torch.int8)
    tensors = {f"{name}.qweight": pack_int4(codes) if lp.weight_bits <= 4 else codes.contiguous()}
    tensors |= {f"{name}.{k}": _f32(getattr(lp, k)) for k in _LAYER_TENSORS}
    if lp.out_scale is not None:
        tensors |= {f"{name}.{k}": _f32(getattr(lp, k)) for k in _OUT_TENSORS}
    if lp.smooth is not None:
        tensors[f"{name}.smooth"] = _f32(lp.smooth)
    entry = {"kind": lp.kind, "shape": list(codes.shape), "weight_bits": lp.weight_bits,
             **_granularity(lp), "weight_symmetric": True,
             "weight_storage": "int4_packed" if lp.weight_bits <= 4 else "int8", "act_bits": lp.act_bits,
             "act_granularity": "per_tensor", "act_symmetric": False,
             "act_time_groups": int(lp.act_scale.shape[0]), "act_split": lp.act_split,
             "output_quantized": lp.out_scale is not None}
    if lp.smooth is not None:  # written only for balanced layers (quant.smooth)
        entry["act_smooth"] = True
    return tensors, entry


def _encode_matmul(name: str, mp: MatMulQParams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return {f"{name}.{k}": _f32(getattr(mp, k)) for k in MatMulQParams.TENSORS}, {
        "kind": "matmul", "a_bits": mp.a_bits, "b_bits": mp.b_bits, "act_granularity": "per_tensor",
        "act_symmetric": False, "act_time_groups": int(mp.a_scale.shape[0])}


def _encode_site(name: str, sp: SiteQParams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return {f"{name}.{k}": _f32(getattr(sp, k)) for k in SiteQParams.TENSORS}, {
        "kind": "site", "act_bits": sp.bits, "act_granularity": "per_tensor", "act_symmetric": False,
        "act_time_groups": int(sp.scale.shape[0])}


def _decode_layer(name: str, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LayerQParams:
    raw = tensors.pop(f"{name}.qweight")
    shape = tuple(info["shape"])
    numel = int(torch.Size(shape).numel())
    codes = unpack_int4(raw, numel).reshape(shape) if info["weight_storage"] == "int4_packed" else raw.reshape(shape)
    out = {k: tensors.pop(f"{name}.{k}") for k in _OUT_TENSORS} if info.get("output_quantized") else {}
    smooth = tensors.pop(f"{name}.smooth") if info.get("act_smooth") else None
    return LayerQParams(kind=info["kind"], weight_bits=int(info["weight_bits"]), act_bits=int(info["act_bits"]),
                        act_split=info.get("act_split"), weight_int=codes.to(torch.int8), smooth=smooth,
                        **{k: tensors.pop(f"{name}.{k}") for k in _LAYER_TENSORS}, **out)


def _decode_matmul(name: str, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MatMulQParams:
    return MatMulQParams(int(info["a_bits"]), int(info["b_bits"]),
                         *(tensors.pop(f"{name}.{k}") for k in MatMulQParams.TENSORS))


def _decode_site(name: str, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SiteQParams:
    return SiteQParams(int(info["act_bits"]), *(tensors.pop(f"{name}.{k}") for k in SiteQParams.TENSORS))


_ENCODERS: dict[type, Callable[[str, Any], tuple[dict[str, torch.Tensor], dict[str, Any]]]] = {
    LayerQParams: _encode_layer, MatMulQParams: _encode_matmul, SiteQParams: _encode_site}
_DECODERS: dict[str, Callable[[str, dict[str, Any], dict[str, torch.Tensor]], Any]] = {
    "conv2d": _decode_layer, "linear": _decode_layer, "matmul": _decode_matmul, "site": _decode_site}


def encode(state: QState) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(tensors by name, qmap layer entries by layer name) of ``state``."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, lp in state.items():
        t, layers[name] = _ENCODERS[type(lp)](name, lp)
        tensors |= t
    return tensors, layers


def decode(tensors: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]], where: str) -> QState:
    """The QState of qmap ``layers``; its tensors are taken out of ``tensors`` (what is left there is not part
    of the state). ``where`` names the file in errors."""
    state: QState = {}
    for name, info in layers.items():
        decoder = _DECODERS.get(info.get("kind"))
        if decoder is None:
            raise ArtifactError(f"{where}: layer {name} has kind {info.get('kind')!r}: expected one of "
                                f"{', '.join(_DECODERS)}")
        try:
            state[name] = decoder(name, info, tensors)
        except KeyError as e:
            raise ArtifactError(f"{where}: tensor {e.args[0]} for layer {name} is missing") from None
    return state


def write(folder: Path, tensors_file: str, state: QState, groups: TimeGroups, *,
          header: dict[str, Any] | None = None, trailer: dict[str, Any] | None = None,
          extra_tensors: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
    """Write ``folder/qmap.json`` and ``folder/<tensors_file>`` for ``state``; ``header`` entries follow
    format_version, ``trailer`` entries follow the layers; ``extra_tensors`` (the network's float tensors of an
    export) are stored beside the state's. Returns the layer entries."""
    tensors, layers = encode(state)
    (folder / tensors_file).parent.mkdir(parents=True, exist_ok=True)
    save_file({**tensors, **(extra_tensors or {})}, folder / tensors_file)
    write_json(folder / QMAP, {"format_version": FORMAT_VERSION, **(header or {}),
                               "time_groups": {"count": groups.count, "thresholds": list(groups.thresholds)},
                               "layers": layers, **(trailer or {})})
    return layers


def read_qmap(folder: Path) -> dict[str, Any]:
    """``folder/qmap.json``, checked for a supported format_version."""
    qmap = read_json(Path(folder) / QMAP)
    if qmap.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}/{QMAP}: format_version = {qmap.get('format_version')!r} is not supported: "
                            f"expected {FORMAT_VERSION}")
    return qmap


def time_groups(qmap: dict[str, Any]) -> TimeGroups:
    return TimeGroups(tuple(qmap.get("time_groups", {}).get("thresholds", [])))


def read(folder: Path, tensors_file: str) -> tuple[QState, TimeGroups, dict[str, torch.Tensor], dict[str, Any]]:
    """(state, time groups, the file's other tensors, qmap) written by :func:`write`."""
    qmap = read_qmap(folder)
    tensors = load_tensors(Path(folder) / tensors_file)
    state = decode(tensors, qmap["layers"], f"{folder}/{tensors_file}")
    return state, time_groups(qmap), tensors, qmap
