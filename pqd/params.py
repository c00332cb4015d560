"""Typed, validated parameters loaded from params.yaml.

Every section is a frozen dataclass. ``load_params`` checks every key before any stage does work:
unknown keys, wrong types and out-of-range values raise :class:`ParamError` with a one-line message
naming the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamError(ValueError):
    """A parameter (or input) that is not allowed. The message is one line."""


# ----------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class ModelParams:
    """Where the full-precision model comes from (``model.*``)."""

    source: str = "demo:digits"  # demo:digits | a local diffusers pipeline folder | a hub id org/name
    revision: str = "main"  # hub revision, only for hub ids
    seed: int = 0
    train_steps: int = 1200  # demo: UNet optimisation steps
    batch_size: int = 128  # demo: UNet training batch
    lr: float = 2e-3  # demo: UNet learning rate
    channels: tuple[int, ...] = (32, 64, 64)  # demo: UNet block_out_channels
    feature_epochs: int = 30  # demo: digit feature network epochs


@dataclass(frozen=True)
class GenerateParams:
    """Full-precision trajectories and samples (``generate.*``)."""

    scheduler: Literal["ddim", "ddpm", "keep"] = "ddim"  # keep = the pipeline's own scheduler class
    steps: int = 50
    eta: float = 0.0  # DDIM eta (0 = deterministic)
    calib_seeds: int = 64  # number of calibration trajectories
    eval_samples: int = 1000  # FP samples from the evaluation seeds (and as many again for the noise floor)
    batch_size: int = 250
    shard_size: int = 16  # calibration trajectories per safetensors shard
    prompts: str | None = None  # text-guided models: a file with one prompt per line (seeds take them in turn)
    guidance_scale: float = 7.5  # text-guided models: classifier-free guidance weight (1 = conditional branch only)


@dataclass(frozen=True)
class SelectParams:
    """Which trajectory inputs become the calibration set (``select.*``)."""

    # None = from the calibrate.method preset (pqd.methods)
    timesteps: Literal["gaussian", "uniform"] | None = None
    mu: float | None = None  # mean over the normalised step position u (0 = first, noisiest step; 1 = last)
    sigma: float | None = None
    num_samples: int = 512
    rule: Literal["kcenter", "random", "first"] | None = None
    seed: int = 0
    shard_size: int = 256  # calibration inputs per safetensors shard (calibrate streams them shard by shard)


@dataclass(frozen=True)
class QuantParams:
    """Bit widths (``quant.*``)."""

    weight_bits: int = 8
    act_bits: int = 8
    edge_bits: int = 8  # weights of the first/last convolution and the time embedding (never below weight_bits)
    # quantize each layer's output too (but the last convolution's): integer kernels (onnxruntime's
    # QLinearConv/QLinearMatMul/QGemm) read and write uint8, so this is what the deployed model computes
    outputs: bool = True
    # 8-bit weights use 7-bit codes [-64, 63]: onnxruntime's fast u8s8 kernels saturate on x86 CPUs without
    # VNNI (AVX2, plain AVX-512) with full-range codes; false for VNNI, ARM or GPU targets
    reduce_range: bool = True
    # quantize attention's Q·Kᵀ and softmax·V matmuls too (both operands per tensor, per time group)
    attention: bool = False
    softmax_bits: int = 16  # grid of the softmax output (the first operand of softmax·V) when attention is quantized


@dataclass(frozen=True)
class CalibrateParams:
    """How quantizers are fitted (``calibrate.*``). Keys left None come from the ``method`` preset."""

    method: Literal["minmax", "ptq4dm", "qdiffusion", "pqd"] = "pqd"
    weight_range: Literal["minmax", "mse"] | None = None
    act_range: Literal["minmax", "mse"] | None = None
    time_groups: int | None = None  # G contiguous groups of steps with their own activation parameters
    reconstruct: bool | None = None  # block reconstruction
    adaround: bool | None = None  # learned weight rounding during reconstruction
    lsq: bool | None = None  # learned activation step sizes during reconstruction
    qdrop_p: float | None = None  # QDrop probability during reconstruction
    split_shortcut: bool | None = None  # separate activation parameters for the two halves of skip concatenations
    batch_size: int = 128
    act_samples: int = 200_000  # values kept per layer for the activation range search
    recon_iters: int = 300  # optimisation steps per reconstruction unit
    recon_batch_size: int = 32
    lr_round: float = 1e-2
    lr_act: float = 1e-3
    round_weight: float = 0.01
    memory_mb: int = 1024  # a reconstruction unit whose recordings (inputs + FP outputs) exceed this keeps them on disk
    seed: int = 0  # reconstruction: batch sampling and QDrop masks (seeded generators, never the global RNG)


@dataclass(frozen=True)
class ExportParams:
    """Export format options (``export.*``)."""

    float_dtype: Literal["float32", "float16"] = "float32"  # storage of the non-quantized tensors
    onnx: bool = True  # also write the deployable ONNX graphs (int8 kernels in onnxruntime; needs act_bits 8)


@dataclass(frozen=True)
class EvaluateParams:
    """Evaluation protocol (``evaluate.*``)."""

    features: str = "demo:digits"  # demo:digits | inception | inception:/path/to/weights.pt | torchscript:/path.pt
    reference: str = "demo:digits"  # demo:digits | a folder of images | a .npz with mu and sigma
    batch_size: int = 250
    grid_size: int = 64  # images per side of the FP-vs-quantized grid
    # onnxruntime: the FID of the deployed ONNX artifact (the simulated torch model is measured beside it)
    backend: Literal["torch", "onnxruntime"] = "onnxruntime"


@dataclass(frozen=True)
class ReleaseParams:
    """The release gate's thresholds (``release.*``)."""

    max_fid_delta: float = 2.0  # largest delta FID (quantized minus FP, both vs reference) a release may have
    floor_multiple: float = 3.0  # delta FID must also be <= this multiple of the noise floor


@dataclass(frozen=True)
class Params:
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    model: ModelParams = field(default_factory=ModelParams)
    generate: GenerateParams = field(default_factory=GenerateParams)
    select: SelectParams = field(default_factory=SelectParams)
    quant: QuantParams = field(default_factory=QuantParams)
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)
    export: ExportParams = field(default_factory=ExportParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    release: ReleaseParams = field(default_factory=ReleaseParams)


# ----------------------------------------------------------------------------------------------
# range rules, by dotted key: (check, description of what is allowed)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _source_ok(v: str) -> bool:
    return v == "demo:digits" or v.startswith(("/", ".", "~")) or bool(_HUB_ID.match(v))


def _features_ok(v: str) -> bool:
    return v in ("demo:digits", "inception") or v.startswith(("inception:", "torchscript:"))


_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "model.source": (_source_ok, "'demo:digits', a local folder path, or a hub id like 'google/ddpm-cifar10-32'"),
    "model.train_steps": (lambda v: v >= 1, "an integer >= 1"),
    "model.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "model.lr": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "model.channels": (lambda v: 1 <= len(v) <= 4 and all(c >= 8 and c % 8 == 0 for c in v),
                       "1 to 4 channel counts, each a multiple of 8"),
    "model.feature_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "generate.steps": (lambda v: 2 <= v <= 1000, "an integer in [2, 1000]"),
    "generate.eta": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "generate.calib_seeds": (lambda v: v >= 1, "an integer >= 1"),
    "generate.eval_samples": (lambda v: v >= 2, "an integer >= 2"),
    "generate.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "generate.shard_size": (lambda v: v >= 1, "an integer >= 1"),
    "generate.prompts": (lambda v: Path(v).expanduser().is_file(), "an existing file with one prompt per line"),
    "generate.guidance_scale": (lambda v: 1 <= v <= 50, "a number in [1, 50]"),
    "select.shard_size": (lambda v: v >= 1, "an integer >= 1"),
    "select.mu": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "select.sigma": (lambda v: v > 0 and math.isfinite(v), "a finite number > 0"),
    "select.num_samples": (lambda v: v >= 1, "an integer >= 1"),
    "quant.weight_bits": (lambda v: 2 <= v <= 8, "an integer in [2, 8]"),
    "quant.act_bits": (lambda v: 4 <= v <= 8, "an integer in [4, 8]"),
    "quant.edge_bits": (lambda v: 2 <= v <= 8, "an integer in [2, 8]"),
    "quant.softmax_bits": (lambda v: 4 <= v <= 16, "an integer in [4, 16]"),
    "calibrate.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "calibrate.time_groups": (lambda v: v >= 1, "an integer >= 1 (and at most generate.steps)"),
    "calibrate.qdrop_p": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "calibrate.recon_iters": (lambda v: v >= 0, "an integer >= 0"),
    "calibrate.recon_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "calibrate.lr_round": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "calibrate.lr_act": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "calibrate.round_weight": (lambda v: v >= 0, "a number >= 0"),
    "calibrate.act_samples": (lambda v: v >= 1000, "an integer >= 1000"),
    "calibrate.memory_mb": (lambda v: v >= 0, "an integer >= 0 (0: every unit's recordings on disk)"),
    "evaluate.features": (_features_ok,
                          "'demo:digits', 'inception', 'inception:<weights file>' or 'torchscript:<file>'"),
    "evaluate.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "release.max_fid_delta": (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0"),
    "release.floor_multiple": (lambda v: v > 0 and math.isfinite(v), "a finite number > 0"),
    "evaluate.grid_size": (lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"),
}


# ----------------------------------------------------------------------------------------------
# conversion


def _optional_inner(tp: Any) -> Any | None:
    """X for ``X | None``, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return None


def _describe(tp: Any, key: str = "") -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        from pqd.methods import METHOD_KEYS

        return _describe(inner) + (" (or null for the method's preset)" if key in METHOD_KEYS else " (or null)")
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(key: str, value: Any, tp: Any) -> Any:
    def bad() -> ParamError:
        return ParamError(f"params: {key} = {value!r} is not allowed: expected {_describe(tp, key)}")

    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _convert(key, value, inner)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        inner = typing.get_args(tp)[0]
        return tuple(_convert(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise bad()
        return value
    raise TypeError(f"unsupported parameter type {tp}")  # a programming error, not a user error


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamError(f"params: {prefix.rstrip('.') or 'params.yaml'} = {data!r} is not allowed: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ParamError(f"params: unknown key {prefix}{unknown[0]}: allowed keys are {', '.join(prefix + n for n in names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key + ".")
            continue
        value = _convert(key, data[name], tp)
        rule = _RULES.get(key)
        if rule is not None and value is not None and not rule[0](value):
            raise ParamError(f"params: {key} = {data[name]!r} is not allowed: expected {rule[1]}")
        kwargs[name] = value
    return cls(**kwargs)


def _check_across(p: Params) -> None:
    """Rules that involve more than one key."""
    if p.calibrate.time_groups > p.generate.steps:
        raise ParamError(f"params: calibrate.time_groups = {p.calibrate.time_groups} is not allowed: expected at most "
                         f"generate.steps = {p.generate.steps}")
    if p.export.onnx and p.quant.act_bits != 8:
        raise ParamError(f"params: export.onnx = true is not allowed with quant.act_bits = {p.quant.act_bits}: "
                         "expected quant.act_bits = 8 (integer kernels take uint8 activations) or export.onnx = false")
    if p.export.onnx and p.quant.attention and p.quant.softmax_bits < 8:
        raise ParamError(f"params: quant.softmax_bits = {p.quant.softmax_bits} is not allowed with export.onnx = true: "
                         "expected 8..16 (integer kernels take 8-bit operands; wider grids run as float arithmetic)")
    if p.evaluate.backend == "onnxruntime" and not p.export.onnx:
        raise ParamError("params: evaluate.backend = 'onnxruntime' is not allowed with export.onnx = false: "
                         "expected export.onnx = true or evaluate.backend = 'torch'")
    cap = p.generate.calib_seeds * p.generate.steps
    if p.select.num_samples > cap:
        raise ParamError(
            f"params: select.num_samples = {p.select.num_samples} is not allowed: expected at most "
            f"generate.calib_seeds x generate.steps = {cap}")


def _apply_method(p: Params) -> Params:
    """Fill every method-controlled key left None with the calibrate.method preset (pqd.methods)."""
    from pqd.methods import PRESETS

    preset = PRESETS[p.calibrate.method]
    sections = {}
    for section in ("select", "calibrate"):
        sec = getattr(p, section)
        fill = {k.split(".", 1)[1]: v for k, v in preset.items()
                if k.startswith(section + ".") and getattr(sec, k.split(".", 1)[1]) is None}
        sections[section] = dataclasses.replace(sec, **fill)
    return dataclasses.replace(p, **sections)


def params_from_dict(data: Any) -> Params:
    p = _apply_method(_build(Params, data, ""))
    _check_across(p)
    return p


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamError (one line) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params: file {path} not found: expected a params.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ParamError(f"params: {path} is not valid YAML ({first})") from None
    return params_from_dict(data)


def as_dict(p: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for JSON/YAML output."""
    d = dataclasses.asdict(p)

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return [fix(x) for x in v]
        return v

    return fix(d)


def resolve_device(p: Params) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without a GPU is an error."""
    import torch

    if p.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if p.device == "cuda" and not torch.cuda.is_available():
        raise ParamError("params: device = 'cuda' is not allowed here: no CUDA device is visible; use 'auto' or 'cpu'")
    return p.device


def main(argv: list[str] | None = None) -> int:
    """``python -m pqd.params [params.yaml]``: validate and print a one-line verdict."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "params.yaml"
    try:
        load_params(path)
    except ParamError as e:
        print(f"pqd: error: {e}", file=sys.stderr)
        return 2
    print(f"pqd: {path} is valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
