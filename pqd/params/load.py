"""Reading and validating params.yaml into the typed sections of :mod:`pqd.params.sections`.

Unknown keys, keys written twice, wrong types and out-of-range values raise :class:`ParamError` with a one-line
message naming the dotted key, the bad value and what is allowed. Method-controlled keys left null are filled
from the ``calibrate.method`` preset (:mod:`pqd.params.methods`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pqd.errors import ParamError
from pqd.params.machine import resolve_device
from pqd.params.decode import Decoder
from pqd.params.methods import METHOD_KEYS, PRESETS
from pqd.params.sections import DEMO_SOURCES, GLUE_KINDS, SAMPLE_SEED_BASE, Params


# ---- range rules, by dotted key: (check, description of what is allowed) ---------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SCHEDULER = re.compile(r"^(tcp|tls)://[^\s/:]+:\d{1,5}$")

_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "model.source": (lambda v: v in DEMO_SOURCES or v.startswith(("/", ".", "~")) or bool(_HUB_ID.match(v)),
                     "'demo:digits', 'demo:digits16', 'demo:digits-dit', a local folder path, or a hub id like "
                     "'google/ddpm-cifar10-32'"),
    "model.train_steps": (lambda v: v >= 1, "an integer >= 1"),
    "model.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "model.lr": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "model.channels": (lambda v: 1 <= len(v) <= 4 and all(c >= 8 and c % 8 == 0 for c in v),
                       "1 to 4 channel counts, each a multiple of 8"),
    "model.feature_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "model.dit_width": (lambda v: v >= 32 and v % 32 == 0, "a multiple of 32 (heads of 32 channels)"),
    "model.dit_depth": (lambda v: v >= 1, "an integer >= 1"),
    "generate.steps": (lambda v: 2 <= v <= 1000, "an integer in [2, 1000]"),
    "generate.eta": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "generate.calib_seeds": (lambda v: v >= 1, "an integer >= 1"),
    "generate.calib_seed_base": (lambda v: 0 <= v < 2**62, "an integer in [0, 2**62)"),
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
    "quant.modulation_bits": (lambda v: 2 <= v <= 8, "an integer in [2, 8]"),
    "quant.weight_group_size": (lambda v: v == 0 or v >= 4, "0 (per output channel) or an integer >= 4"),
    "quant.weight_bits_budget": (lambda v: v is None or 2 <= v <= 40, "null (off) or a number in [2, 40]"),
    "calibrate.sensitivity_samples": (lambda v: v >= 1, "an integer >= 1"),
    "quant.smooth_alpha": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "quant.glue": (lambda v: set(v) <= set(GLUE_KINDS) and len(set(v)) == len(v),
                   f"a list of distinct kinds from {', '.join(GLUE_KINDS)}"),
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
    "calibrate.recon_wave": (lambda v: v >= 1, "an integer >= 1 (1: each unit after the one before it)"),
    "calibrate.gptq_damp": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "checkpoint.keep_mb": (lambda v: v >= 0, "an integer >= 0 (0: remove a completed stage's checkpoint)"),
    "evaluate.features": (lambda v: v in ("demo:digits", "inception") or v.startswith(("inception:", "torchscript:")),
                          "'demo:digits', 'inception', 'inception:<weights file>' or 'torchscript:<file>'"),
    "evaluate.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "evaluate.bootstrap": (lambda v: v == 0 or v >= 100, "0 (no intervals) or an integer >= 100"),
    "evaluate.bootstrap_seed": (lambda v: v >= 0, "an integer >= 0"),
    "evaluate.confidence": (lambda v: 0.5 <= v < 1, "a number in [0.5, 1)"),
    "release.delta_fid_fraction": (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0"),
    "release.fid_vs_fp_fraction": (lambda v: v > 0 and math.isfinite(v), "a finite number > 0"),
    "release.psnr_margin_db": (lambda v: math.isfinite(v), "a finite number (dB)"),
    "evaluate.grid_size": (lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"),
    "parallel.scheduler": (lambda v: v in ("none", "local") or bool(_SCHEDULER.match(v)),
                           "'none', 'local' or a Dask scheduler address like 'tcp://10.0.0.5:8786'"),
    "parallel.workers": (lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"),
    "parallel.threads_per_worker": (lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"),
}


# ---- conversion ------------------------------------------------------------------------------


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
    if origin is Literal:  # exact type too: YAML's 1 is not true
        if not any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            raise bad()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        inner = typing.get_args(tp)[0]
        return tuple(_convert(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp not in _SCALARS:
        raise TypeError(f"unsupported parameter type {tp}")  # a programming error, not a user error
    if not _SCALARS[tp](value):
        raise bad()
    return float(value) if tp is float else value


# what a scalar parameter's YAML value must be (YAML's true is not an integer)
_SCALARS: dict[type, typing.Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str) and v != ""}


class _ParamsDecoder(Decoder):
    """params.yaml's sections: a missing key takes its default, a null section is all defaults, each value is
    converted to its field's type and checked against its range rule."""

    def mapping(self, data: Any, where: str) -> dict:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ParamError(f"params: {where or 'params.yaml'} = {data!r} is not allowed: expected a mapping")
        return data

    def unknown(self, cls: type, key: str, names: list[str], where: str) -> Exception:
        return ParamError(f"params: unknown key {self.child(where, key)}: allowed keys are "
                          f"{', '.join(self.child(where, n) for n in names)}")

    def leaf(self, tp: Any, value: Any, where: str) -> Any:
        converted = _convert(where, value, tp)
        rule = _RULES.get(where)
        if rule is not None and converted is not None and not rule[0](converted):
            raise ParamError(f"params: {where} = {value!r} is not allowed: expected {rule[1]}")
        return converted


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
    if p.evaluate.backend != "torch" and not p.export.onnx:
        raise ParamError(f"params: evaluate.backend = {p.evaluate.backend!r} is not allowed with export.onnx = false: "
                         "expected export.onnx = true or evaluate.backend = 'torch'")
    g = p.generate
    calib = (g.calib_seed_base, g.calib_seed_base + g.calib_seeds)
    for name, base in SAMPLE_SEED_BASE.items():
        if calib[0] < base + g.eval_samples and base < calib[1]:
            raise ParamError(
                f"params: generate.calib_seed_base = {g.calib_seed_base} is not allowed: the calibration seeds "
                f"{calib[0]}..{calib[1] - 1} overlap the FP sample set {name}'s seeds {base}..{base + g.eval_samples - 1}; "
                "expected a base clear of both sets (e.g. 1000000000 + k * 1000000)")
    cap = p.generate.calib_seeds * p.generate.steps
    if p.select.num_samples > cap:
        raise ParamError(
            f"params: select.num_samples = {p.select.num_samples} is not allowed: expected at most "
            f"generate.calib_seeds x generate.steps = {cap}")


def _apply_method(p: Params) -> Params:
    """Fill every method-controlled key left None with the calibrate.method preset (pqd.params.methods)."""
    preset = PRESETS[p.calibrate.method]
    sections = {}
    for section in ("select", "calibrate"):
        sec = getattr(p, section)
        fill = {k.split(".", 1)[1]: v for k, v in preset.items()
                if k.startswith(section + ".") and getattr(sec, k.split(".", 1)[1]) is None}
        sections[section] = dataclasses.replace(sec, **fill)
    return dataclasses.replace(p, **sections)


def _check_explicit(p: Params) -> None:
    """Rules on keys as written, before the method preset fills in the rest: a preset's split skip concatenations
    (calibrate.split_shortcut from qdiffusion) simply leave the 'concat' glue out (pqd.diffusion.glue), but both
    written at once ask for two things that cannot both be had."""
    if "concat" in p.quant.glue and p.calibrate.split_shortcut:
        raise ParamError("params: quant.glue = ['concat', ...] is not allowed with calibrate.split_shortcut = true (the "
                         "split layers quantize the concatenation's two parts themselves): expected "
                         "calibrate.split_shortcut = false or no 'concat'")


def params_from_dict(data: Any) -> Params:
    p = _ParamsDecoder().decode(Params, data)
    _check_explicit(p)
    p = _apply_method(p)
    _check_across(p)
    return p


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; a missing file, invalid YAML or a key written twice is a ParamError."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params: file {path} not found: expected a params.yaml")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problem = getattr(e, "problem", None)
        first = problem if problem and "twice" in problem else (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ParamError(f"params: {path} is not valid YAML ({first})") from None


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """params.yaml content with ``key.sub=value`` overrides applied (values parsed as YAML, like dvc -S)."""
    out = yaml.safe_load(yaml.safe_dump(params))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamError(f"override {item!r} is not allowed: expected key.subkey=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamError(f"override {item!r} is not allowed: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamError (one line) on any problem."""
    return params_from_dict(read_yaml(path))


def as_dict(p: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for JSON/YAML output."""
    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return [fix(x) for x in v]
        return v

    return fix(dataclasses.asdict(p))


def _missing_path(value: str, kind: str, produced: tuple[str, ...]) -> str | None:
    """Why ``value`` (a path named in params) cannot be used, or None when it can. ``kind``: 'file', 'folder'
    or 'file or folder'. A path inside a pipeline output in ``produced`` (dvc.yaml outs) is accepted
    before it exists: a stage makes it."""
    path = Path(value).expanduser()
    if not path.exists():
        norm = Path(*path.parts)  # drops a leading ./
        if any(norm == Path(o) or Path(o) in norm.parents for o in produced):
            return None
        return "does not exist"
    if kind == "file" and not path.is_file():
        return "is not a file"
    if kind == "folder" and not path.is_dir():
        return "is not a folder"
    return None


def check_paths(p: Params, produced: tuple[str, ...] = ()) -> None:
    """Every file or folder named in ``p`` exists (or is made by the pipeline: ``produced``); a ParamError
    naming the key otherwise. Run by ``python -m pqd.params`` (``make run``'s first step), so a typo fails
    before any long stage runs rather than in the stage that reads the path."""
    checks: list[tuple[str, str, str, str]] = []  # key, value, kind, what is expected
    src = p.model.source
    if src.startswith(("/", ".", "~")):
        checks.append(("model.source", src, "folder", "a diffusers pipeline folder (save_pretrained layout)"))
    for prefix in ("inception:", "torchscript:"):
        if p.evaluate.features.startswith(prefix):
            checks.append(("evaluate.features", p.evaluate.features[len(prefix):], "file",
                           f"'{prefix}<an existing file>'"))
    ref = p.evaluate.reference
    if ref not in DEMO_SOURCES:
        kind = "file" if ref.endswith(".npz") else "folder"
        checks.append(("evaluate.reference", ref, kind, "'demo:digits', 'demo:digits16', 'demo:digits-dit', a folder of images, or a .npz "
                                                        "with mu and sigma"))
    if p.generate.prompts is not None:
        checks.append(("generate.prompts", p.generate.prompts, "file", "a file with one prompt per line"))
    for key, value, kind, expected in checks:
        why = _missing_path(value, kind, produced)
        if why:
            shown = p.evaluate.features if key == "evaluate.features" else value
            raise ParamError(f"params: {key} = {shown!r} is not allowed: {value} {why}; expected {expected}")
    if src.startswith(("/", ".", "~")) and Path(src).expanduser().is_dir() \
            and not (Path(src).expanduser() / "model_index.json").is_file():
        raise ParamError(f"params: model.source = {src!r} is not allowed: the folder has no model_index.json; expected "
                         "a diffusers pipeline folder (save_pretrained layout)")


def pipeline_outputs(dvc_yaml: Path) -> tuple[str, ...]:
    """Every ``outs`` path of the stages in ``dvc_yaml`` (none when there is no such file)."""
    if not dvc_yaml.is_file():
        return ()
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    return tuple(o if isinstance(o, str) else next(iter(o)) for st in stages.values() for o in st.get("outs", []))


def check_pipeline(p: Params) -> None:
    """Rules that a whole pipeline run must meet and one stage alone need not (the model stage takes any pipeline
    folder whatever evaluate says): checked by ``python -m pqd.params`` and by the flows before their first stage,
    so a run does not calibrate for minutes and then fail in evaluate."""
    if p.evaluate.features == "demo:digits" and p.model.source not in DEMO_SOURCES:
        raise ParamError(f"params: evaluate.features = 'demo:digits' is not allowed with model.source = "
                         f"{p.model.source!r}: the digit feature network comes with the demo models only; expected "
                         f"model.source {', '.join(repr(s) for s in DEMO_SOURCES)} or evaluate.features 'inception', "
                         "'inception:<weights file>' or 'torchscript:<file>'")


def check_params_file(path: str | Path) -> Params:
    """The params file at ``path``, with every key valid, every path it names present (or an ``outs`` of the dvc.yaml
    beside it: a stage makes it) and its device usable on this machine; a ParamError otherwise. Everything about
    params that can be known before the first stage (``python -m pqd.params``)."""
    path = Path(path)
    p = load_params(path)
    check_paths(p, pipeline_outputs(path.parent / "dvc.yaml"))
    check_pipeline(p)
    resolve_device(p)
    return p
