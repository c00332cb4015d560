"""QState <-> files: the calibrate stage's output format (qstate/), read back by export."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from pqd.core.quantize import LayerQParams, MatMulQParams, QState
from pqd.core.timegroups import TimeGroups
from pqd.io import load_tensors, read_json, write_json

TENSORS = ("weight_int", "weight_scale", "act_scale", "act_zero_point")
OUT_TENSORS = ("out_scale", "out_zero_point")  # only for layers whose output is quantized


def save_qstate(state: QState, folder: Path, extra: dict | None = None) -> None:
    tensors = {f"{name}.{k}": getattr(lp, k).contiguous() for name, lp in state.items()
               for k in (MatMulQParams.TENSORS if lp.kind == "matmul" else TENSORS + OUT_TENSORS) if getattr(lp, k) is not None}
    save_file(tensors, folder / "qstate.safetensors")
    layers = {name: {"kind": "matmul", "a_bits": lp.a_bits, "b_bits": lp.b_bits} if lp.kind == "matmul" else
              {"kind": lp.kind, "weight_bits": lp.weight_bits, "act_bits": lp.act_bits, "act_split": lp.act_split}
              for name, lp in state.items()}
    write_json(folder / "layers.json", {"layers": layers, **(extra or {})})


def load_qstate(folder: Path) -> QState:
    """The QState saved by :func:`save_qstate` (see :func:`load_time_groups` for the time grouping)."""
    meta = read_json(folder / "layers.json")["layers"]
    tensors = load_tensors(folder / "qstate.safetensors")
    state: QState = {}
    for name, info in meta.items():
        try:
            if info["kind"] == "matmul":
                state[name] = MatMulQParams(int(info["a_bits"]), int(info["b_bits"]),
                                            *(tensors[f"{name}.{k}"] for k in MatMulQParams.TENSORS))
                continue
            state[name] = LayerQParams(kind=info["kind"], weight_bits=int(info["weight_bits"]),
                                       act_bits=int(info["act_bits"]), act_split=info.get("act_split"),
                                       **{k: tensors[f"{name}.{k}"] for k in TENSORS},
                                       **{k: tensors.get(f"{name}.{k}") for k in OUT_TENSORS})
        except KeyError as e:
            raise ValueError(f"{folder}/qstate.safetensors: tensor {e.args[0]} for layer {name} is missing") from None
    return state


def load_time_groups(folder: Path) -> TimeGroups:
    return TimeGroups(tuple(read_json(folder / "layers.json").get("time_group_thresholds", [])))
