"""The stages' metrics files (``data/metrics/<stage>.json``, flat JSON objects) as frozen dataclasses.

Fields that only some runs have are None when absent and left out of the file. Reading refuses a file with an
unknown or a missing key in one line; a key an earlier version wrote under another name (``RENAMED_KEYS``) is read
under its present name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pqd.errors import InputError
from pqd.formats.files import read_json, write_json
from pqd.params.decode import Decoder

T = TypeVar("T", bound="StageMetrics")

# metrics class -> {key written by earlier versions: its present name}; files already written stay readable
RENAMED_KEYS: dict[str, dict[str, str]] = {"CalibrateMetrics": {"unet_output_mse": "output_mse"}}


class _MetricsDecoder(Decoder):
    """A metrics file: every key without a default must be there; dataclasses (also optional ones, and tuples
    of them) are rebuilt, the other values are kept as JSON gave them."""

    def mapping(self, data: Any, where: str) -> dict:
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object, found {type(data).__name__}")
        return data

    def decode(self, cls: type, data: Any, where: str = "") -> Any:
        renamed = RENAMED_KEYS.get(cls.__name__, {})
        if renamed and isinstance(data, dict):
            data = {renamed.get(k, k): v for k, v in data.items()}
        return super().decode(cls, data, where)

    def unknown(self, cls: type, key: str, names: list[str], where: str) -> Exception:
        return InputError(f"{where}: unknown key {key!r}: expected the keys of {cls.__name__} "
                          "(written by another version of pqd? re-run the stage: dvc repro)")

    def missing(self, cls: type, key: str, where: str) -> Exception | None:
        return InputError(f"{where}: key {key!r} is missing: expected every key of {cls.__name__} "
                          "(re-run the stage: dvc repro)")

    def field(self, tp: Any, value: Any, where: str) -> Any:
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and len(args) == 1:  # X | None: read as X
            tp, args = args[0], list(typing.get_args(args[0]))
        if dataclasses.is_dataclass(tp):
            return self.decode(tp, value, where)
        if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            return tuple(self.decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return value


_DECODER = _MetricsDecoder()


def _to_value(v: Any) -> Any:
    if dataclasses.is_dataclass(v):  # a None field whose default is None is absent, not null
        return {f.name: _to_value(getattr(v, f.name)) for f in dataclasses.fields(v)
                if not (getattr(v, f.name) is None and f.default is None)}
    if isinstance(v, (tuple, list)):
        return [_to_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_value(x) for k, x in v.items()}
    return v


@dataclass(frozen=True, kw_only=True)
class StageMetrics:
    """What every stage records: its wall time in seconds (set by the stage shell, pqd.stages._cli)."""

    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return _to_value(self)

    @classmethod
    def from_json(cls: type[T], data: Any, where: str = "metrics") -> T:
        return _DECODER.decode(cls, data, where)

    @classmethod
    def read(cls: type[T], path: str | Path) -> T:
        return cls.from_json(read_json(path), str(path))

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    def get(self, key: str) -> Any:
        """The value at a dotted key (``delta_fid``, ``delta_fid_ci.hi``), None where any part is absent."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part, None)
        return value


@dataclass(frozen=True, kw_only=True)
class ModelMetrics(StageMetrics):
    unet_parameters: int
    unet_fp32_bytes: int
    unet_train_seconds: float | None = None  # demo:digits only
    digitnet_train_seconds: float | None = None
    digitnet_heldout_accuracy: float | None = None


@dataclass(frozen=True)
class ParallelRun:
    """Where a stage sampled (``parallel.*`` as it ran): recorded beside the results, never in their hashes."""

    scheduler: str  # none | local | the address of the Dask scheduler it connected to
    workers: int  # processes that sampled (1 for none)
    threads_per_worker: int  # torch threads of each
    ranges: int  # seed ranges (tasks): one per sampling batch or trajectory shard
    dashboard: str | None = None  # the Dask dashboard's address


@dataclass(frozen=True, kw_only=True)
class GenerateMetrics(StageMetrics):
    calib_trajectories: int
    trajectory_inputs: int
    family: str  # pixel | latent | text | class
    prompts: int  # prompts (text models) or classes (class-conditional models) the seeds take in turn
    eval_samples: int
    floor_samples: int
    parallel: ParallelRun | None = None
    architecture: str | None = None  # unet | dit | pixart | sd3 (pqd.diffusion.archs)


@dataclass(frozen=True, kw_only=True)
class SelectMetrics(StageMetrics):
    calib_samples: int
    drawn_inputs: int
    branches: int
    distinct_steps: int
    mean_u: float


@dataclass(frozen=True, kw_only=True)
class CalibrateMetrics(StageMetrics):
    method: str
    layers: int
    output_quantized_layers: int
    attention_matmuls: int
    calib_samples: int
    glue_sites: int = 0  # quant.glue: activations between integer kernels on integer grids
    time_groups: int
    output_mse: float
    fit_seconds: float
    reconstruction_seconds: float
    reconstructed_units: int
    units_improved: int
    units_recorded_on_disk: int
    weight_rel_mse_mean: float
    weight_rel_mse_max: float
    weight_code_bits: int  # width of the stored weight codes of the body layers: 7 for 8-bit weights as 7-bit codes
    reduce_range: bool  # quant.reduce_range as resolved for the calibrating machine
    integer_codes: str  # why (pqd.params.machine.IntegerCodes.reason)
    smoothed_layers: int | None = None  # linears balanced by quant.smooth (absent when none)
    weight_bits_mean: float | None = None  # average bits per weight: codes at their width + fp32 scales, every layer
    mixed_high_layers: int | None = None  # quant.weight_bits_budget: layers moved to 8 bits (absent when off)
    # reconstructed_units taken from checkpoint.dir (an interrupted run's results), not recomputed (absent when off)
    units_from_checkpoint: int | None = None
    rotated_attention: int | None = None  # quant.rotate: attention modules whose value path was rotated (absent: off)


@dataclass(frozen=True)
class OnnxGroupCheck:
    """The deployed graph of one time group against the torch model on probe inputs."""

    group: int
    timestep: float
    max_abs: float
    rel_to_quant_error: float  # ||onnx - torch|| / ||torch - fp||


@dataclass(frozen=True, kw_only=True)
class ExportMetrics(StageMetrics):
    quantized_layers: int
    files: int
    fp32_unet_bytes: int
    export_unet_bytes: int
    size_ratio: float
    packed_int4_layers: int
    weight_bits_mean: float | None = None  # average bits per quantized weight: codes + fp32 scales
    onnx_graphs: int | None = None  # export.onnx only
    onnx_int8_initializers: int | None = None
    onnx_int4_initializers: int | None = None  # weight codes stored as 4 bits (pqd.deploy.int4)
    onnx_shared_bytes: int | None = None
    onnx_graph_bytes: int | None = None
    onnx_size_ratio: float | None = None  # fp32 denoiser bytes / deployable ONNX bytes (graphs + weights.bin)
    onnx_rel_dev_max: float | None = None
    onnx_check: tuple[OnnxGroupCheck, ...] | None = None
    # the kernel audit of time group 0's graph per runtime (pqd.deploy.kernels): {runtime: {"int8": {kernel: count},
    # "float": {...}, "quantized_layers": n, "integer_layers": n, "fallbacks": [layer], "float_output": [layer]}}
    onnx_kernels: dict[str, dict[str, Any]] | None = None


@dataclass(frozen=True)
class Interval:
    """A two-sided interval [lo, hi] of a statistic (a bootstrap or a t-interval: the record that holds it says)."""

    lo: float
    hi: float

    def __str__(self) -> str:
        return f"[{self.lo:.4g}, {self.hi:.4g}]"


@dataclass(frozen=True)
class EvalProtocol:
    """How the FIDs were measured (recorded next to them)."""

    num_samples: int
    floor_samples: int
    seeds: str
    scheduler: str
    steps: int
    eta: float
    family: str
    prompts: int
    guidance_scale: float | None
    features: str
    reference: str
    reference_images: int
    fid: str
    backend: str
    weight_codes: str  # the export's weight code width and why (quant.reduce_range)
    parallel: ParallelRun | None = None  # where the quantized samples were drawn
    intervals: str | None = None  # how the *_ci intervals were computed (evaluate.bootstrap); None: none were
    architecture: str | None = None  # unet | dit | pixart | sd3 (pqd.diffusion.archs)


@dataclass(frozen=True, kw_only=True)
class EvaluateMetrics(StageMetrics):
    fid_quant_vs_ref: float
    fid_fp_vs_ref: float
    delta_fid: float
    fid_quant_vs_fp: float
    noise_floor: float
    fid_deployed_vs_ref: float | None = None  # evaluate.backend onnxruntime | openvino only
    fid_simulated_vs_ref: float | None = None
    deployed_minus_simulated: float | None = None
    fid_deployed_vs_simulated: float | None = None
    deployed_within_noise_floor: bool | None = None
    psnr_deployed_vs_simulated_median: float | None = None
    psnr_simulated_median: float | None = None  # the simulated model's images against FP (same seeds)
    mse_mean: float
    psnr_mean: float
    psnr_median: float
    psnr_min: float
    # the per-image analogue of the noise floor: mean PSNR between FP images of different seeds (set a image i
    # against set b image i); a quantized image should be far closer to its own FP image than this
    psnr_other_seed_mean: float | None = None
    # bootstrap intervals over the evaluation seeds (pqd.eval.bootstrap; evaluate.bootstrap resamples, paired:
    # quantized and FP images of a seed are drawn together; evaluate.confidence); None when evaluate.bootstrap = 0
    fid_quant_vs_ref_ci: Interval | None = None
    fid_fp_vs_ref_ci: Interval | None = None
    delta_fid_ci: Interval | None = None
    fid_quant_vs_fp_ci: Interval | None = None
    psnr_mean_ci: Interval | None = None
    protocol: EvalProtocol


STAGE_METRICS: dict[str, type[StageMetrics]] = {
    "model": ModelMetrics, "generate": GenerateMetrics, "select": SelectMetrics, "calibrate": CalibrateMetrics,
    "export": ExportMetrics, "evaluate": EvaluateMetrics}
STAGES = tuple(STAGE_METRICS)


@dataclass(frozen=True)
class PipelineMetrics:
    """The metrics of every stage of one result (a stage that has not run yet is None)."""

    model: ModelMetrics | None = None
    generate: GenerateMetrics | None = None
    select: SelectMetrics | None = None
    calibrate: CalibrateMetrics | None = None
    export: ExportMetrics | None = None
    evaluate: EvaluateMetrics | None = None

    @staticmethod
    def read(files: dict[str, Path]) -> "PipelineMetrics":
        """From ``{stage: metrics file}``; files that do not exist are left None."""
        unknown = sorted(set(files) - set(STAGE_METRICS))
        if unknown:
            raise InputError(f"metrics of stage {unknown[0]!r}: expected one of {', '.join(STAGES)}")
        return PipelineMetrics(**{s: STAGE_METRICS[s].read(f) for s, f in files.items() if Path(f).is_file()})

    def present(self) -> dict[str, StageMetrics]:
        return {s: m for s in STAGES if (m := getattr(self, s)) is not None}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {s: m.to_json() for s, m in self.present().items()}

