"""Typed, validated parameters: params.yaml's sections as frozen dataclasses, loading, method presets.

The bottom of the import graph beside :mod:`pqd.errors`: nothing here imports torch or another pqd layer.
``python -m pqd.params`` validates a params file and the paths it names.
"""

from pqd.errors import ParamError
from pqd.params.load import (apply_overrides, as_dict, check_paths, check_pipeline, load_params, params_from_dict,
                             read_yaml)
from pqd.params.machine import IntegerCodes, integer_codes, resolve_device
from pqd.params.sections import (DEMO_SOURCES, SAMPLE_SEED_BASE, CalibrateParams, EvaluateParams, ExportParams,
                                 GenerateParams, ModelParams, ParallelParams, Params, QuantParams, ReleaseParams,
                                 SelectParams)

__all__ = [
    "DEMO_SOURCES", "SAMPLE_SEED_BASE", "CalibrateParams", "EvaluateParams", "ExportParams", "GenerateParams",
    "IntegerCodes", "ModelParams", "ParallelParams", "ParamError", "Params", "QuantParams", "ReleaseParams",
    "SelectParams", "apply_overrides", "as_dict", "check_paths", "check_pipeline", "load_params", "params_from_dict",
    "integer_codes", "read_yaml", "resolve_device",
]
