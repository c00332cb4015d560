"""Pure-torch quantization core: no file I/O, no diffusers, no mlflow."""

from pqd.core.affine import dequantize, fake_quantize, quantize
from pqd.core.modules import ActQuantizer, QuantConv2d, QuantLinear, quant_layers, set_time_group
from pqd.core.packing import pack_int4, unpack_int4
from pqd.core.qtypes import QType, act_qtype, weight_qtype
from pqd.core.quantize import LayerQParams, QState, QuantConfig, apply_qstate, fit_qstate, qstate_of, quantize_weight
from pqd.core.timegroups import TimeGroups

__all__ = [
    "ActQuantizer", "LayerQParams", "QState", "QType", "QuantConfig", "QuantConv2d", "QuantLinear",
    "act_qtype", "apply_qstate", "dequantize", "fake_quantize", "fit_qstate", "pack_int4", "quant_layers",
    "qstate_of", "quantize", "quantize_weight", "TimeGroups", "set_time_group", "unpack_int4", "weight_qtype",
]
