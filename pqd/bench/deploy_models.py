"""What ``make bench-deploy`` times (:mod:`pqd.bench.deploy`): the denoisers, their calibrations and their graphs.

The demo UNet (``data/model``), a UNet with the google/ddpm-cifar10-32 config (random weights: speed does not depend
on the values) and the DiT demo (the model stage's folder, or made here). Each is calibrated with the calibrate
stage's recipe (:func:`~pqd.diffusion.qconfig.calibrate_network`, PQD preset, this machine's integer codes) on the
inputs of its own DDIM trajectories (both guidance branches for a conditioned model), and written by the product's
exporter. The yardstick is onnxruntime's own ``quantize_static`` of the float graph, ``reduce_range`` by the same rule.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pqd import deploy
from pqd.core.quantize import QState, weight_layers
from pqd.core.timegroups import TimeGroups
from pqd.diffusion.adapter import Cond, Denoiser, load_denoiser
from pqd.diffusion.attention import attention_modules
from pqd.diffusion.configs import cifar10_ddpm_pipeline
from pqd.diffusion.demo import train_demo_pipeline
from pqd.diffusion.glue import glue_sites
from pqd.diffusion.qconfig import calibrate_network
from pqd.diffusion.sampling import make_scheduler, sample
from pqd.diffusion.quantized import load_quantized_net
from pqd.formats.export import quantized_weights_file, write_export
from pqd.params import IntegerCodes, Params, params_from_dict
from pqd.params.sections import GLUE_KINDS
from pqd.stages.generate import guidance_scale, prompt_rows

GROUPS = 4
STEPS = 20
DIT_SOURCE = "demo:digits-dit"
# the PQD graphs beyond the plain int8 one (see variants): glue between the integer kernels (quant.glue, with the
# skips split or not) and attention's two matmuls on integer kernels (quant.attention, softmax output on 8 bits)
GLUE = "onnxruntime int8 + glue"
GLUE_NO_SPLIT = "onnxruntime int8 + all glue, no split"
ATTENTION = "onnxruntime int8 + attention matmuls"
GLUE_ATTENTION = "onnxruntime int8 + glue + attention matmuls"
# ... and with one grid per tensor (quant.share_grids)
ATTENTION_SHARED = "onnxruntime int8 + attention matmuls + shared grids"
GLUE_ATTENTION_SHARED = "onnxruntime int8 + glue + attention matmuls + shared grids"
_SHARED = (ATTENTION_SHARED, GLUE_ATTENTION_SHARED)
# ... and with activation grids without an offset (quant.act_symmetric), alone and on the shared-grid graphs
SYM = " + symmetric activations"
SYMMETRIC = "onnxruntime int8" + SYM
_SYMMETRIC = (SYMMETRIC, *(v + SYM for v in _SHARED))
# the graph of the defaults before every fast setting became one (issue 22): no glue, skips split, float attention
# matmuls, a grid per layer, grids with offsets
PREVIOUS = "onnxruntime int8, previous defaults"
VARIANT_CHOICES = {"all": (PREVIOUS, GLUE, GLUE_NO_SPLIT, ATTENTION, GLUE_ATTENTION, *_SHARED, *_SYMMETRIC),
                   "glue": (GLUE, GLUE_NO_SPLIT), "split": (GLUE,), "nosplit": (GLUE_NO_SPLIT,),
                   "attention": (ATTENTION, GLUE_ATTENTION, *_SHARED), "shared": (PREVIOUS, *_SHARED),
                   "symmetric": (PREVIOUS, *_SHARED, *_SYMMETRIC), "previous": (PREVIOUS,), "none": ()}
ATTENTION_SOFTMAX_BITS = 8  # integer kernels take 8-bit operands (a 16-bit softmax output keeps softmax·V in float)


@dataclass(frozen=True)
class Variant:
    """A PQD int8 graph beyond the plain one: glue kinds, calibrate.split_shortcut, quant.attention,
    quant.share_grids, quant.act_symmetric."""

    glue: tuple[str, ...] = ()
    split: bool = True
    attention: bool = False
    share: bool = False
    symmetric: bool = False


@dataclass
class BenchModel:
    name: str  # in the tables: demo, cifar10-ddpm, dit
    den: Denoiser
    folder: Path  # its pipeline folder (the exporter copies every other component from it)
    weights: str  # where its weights come from


def demo_model(folder: Path) -> BenchModel:
    return BenchModel("demo", load_denoiser(folder), folder, f"trained, {folder}")


def cifar_model(tmp: Path, seed: int = 0) -> BenchModel:
    folder = tmp / "cifar10-ddpm-pipe"
    cifar10_ddpm_pipeline(seed).save_pretrained(folder)
    return BenchModel("cifar10-ddpm", load_denoiser(folder), folder, "random weights")


def demo_dit_params() -> Params:
    """params.yaml's defaults with ``model.source: demo:digits-dit`` (the demo DiT's width, depth, training)."""
    return params_from_dict({"model": {"source": DIT_SOURCE}})


def dit_model(folder: Path | None, train_steps: int, tmp: Path) -> BenchModel:
    """The transformer demo: the model stage's pipeline folder, else a DiT with the demo's architecture and training
    settings (model.*) trained here for ``train_steps`` steps (0: its random initial weights)."""
    if folder is not None:
        return BenchModel("dit", load_denoiser(folder), folder, f"trained, {folder}")
    mp = demo_dit_params().model
    folder = tmp / "dit-pipe"
    train_demo_pipeline(DIT_SOURCE, seed=mp.seed, steps=train_steps, batch_size=mp.batch_size, lr=mp.lr,
                        channels=mp.channels, dit_width=mp.dit_width, dit_depth=mp.dit_depth).save_pretrained(folder)
    how = f"trained here for {train_steps} steps" if train_steps else "random weights"
    return BenchModel("dit", load_denoiser(folder), folder,
                      f"{DIT_SOURCE} architecture (width {mp.dit_width}, depth {mp.dit_depth}), {how}")


def bench_params(weight_bits: int, v: Variant | None = None) -> Params:
    """The PQD preset with ``weight_bits``-bit weights and the glue, split and attention of ``v`` (None: the defaults
    of pqd.params, params.yaml's); quant.reduce_range stays at its default, auto (the caller resolves it once:
    pqd.params.integer_codes)."""
    calibrate = {"method": "pqd", "act_samples": 20_000, "time_groups": GROUPS}
    if v is None:
        return params_from_dict({"quant": {"weight_bits": weight_bits}, "calibrate": calibrate})
    attention = {"attention": True, "softmax_bits": ATTENTION_SOFTMAX_BITS} if v.attention else {"attention": False}
    return params_from_dict({"quant": {"weight_bits": weight_bits, "glue": list(v.glue), "share_grids": v.share,
                                       "act_symmetric": v.symmetric, **attention},
                             "calibrate": {**calibrate, "split_shortcut": v.split}})


def default_variant() -> Variant:
    """The graph settings of the defaults as a Variant."""
    p = bench_params(8)
    return Variant(tuple(p.quant.glue), bool(p.calibrate.split_shortcut), p.quant.attention, p.quant.share_grids,
                   p.quant.act_symmetric)


def _graph_key(den: Denoiser, v: Variant) -> tuple:
    """What of ``v`` changes ``den``'s graph: two variants with one key build the same graph."""
    splits = den.skip_splits()
    return (frozenset(glue_sites(den.net, v.glue, splits, v.split)), v.split if splits else None,
            v.attention and bool(attention_modules(den.net)), v.share, v.symmetric)


def variants(den: Denoiser, choice: str = "all") -> dict[str, Variant]:
    """The PQD graphs beyond the default one for ``den`` (of those ``choice`` names, see VARIANT_CHOICES): the
    previous defaults' plain graph; every glue kind but 'concat' with the skip concatenations split; where the
    network has skip concatenations, every kind with the split off; attention's matmuls on integer kernels, alone
    and with the most glue; the most of those with one grid per tensor (quant.share_grids); the plain graph and those
    with activation grids without an offset (quant.act_symmetric). A variant that changes nothing in the network (a
    DiT's blocks have no glue points) is left out, and so is one that builds the default graph."""
    splits = den.skip_splits()
    glue = Variant(tuple(k for k in GLUE_KINDS if k != "concat"), True)
    has_glue = bool(glue_sites(den.net, glue.glue, splits, True))
    has_attention = bool(attention_modules(den.net))
    out = {PREVIOUS: Variant()}
    if has_glue:
        out[GLUE] = glue
    if has_glue and splits:
        out[GLUE_NO_SPLIT] = Variant(GLUE_KINDS, False)
    if has_attention:
        out[ATTENTION] = Variant(attention=True)
        if has_glue:  # with the most glue: every kind with the split off where the network has skip concatenations
            out[GLUE_ATTENTION] = dataclasses.replace(out.get(GLUE_NO_SPLIT, glue), attention=True)
            out[GLUE_ATTENTION_SHARED] = dataclasses.replace(out[GLUE_ATTENTION], share=True)
        else:
            out[ATTENTION_SHARED] = dataclasses.replace(out[ATTENTION], share=True)
    out[SYMMETRIC] = Variant(symmetric=True)
    out |= {name + SYM: dataclasses.replace(out[name], symmetric=True) for name in _SHARED if name in out}
    default = _graph_key(den, default_variant())
    return {name: v for name, v in out.items() if name in VARIANT_CHOICES[choice] and _graph_key(den, v) != default}


def describe(v: Variant, sites: int) -> str:
    parts = [f"quant.glue {', '.join(v.glue)}; split_shortcut {str(v.split).lower()}; {sites} sites" if sites
             else "glue in float"]
    if v.attention:
        parts.append(f"quant.attention, softmax_bits {ATTENTION_SOFTMAX_BITS}")
    if v.share:
        parts.append("quant.share_grids")
    if v.symmetric:
        parts.append("quant.act_symmetric")
    return "; ".join(parts)


@dataclass
class CalibInputs:
    """The network inputs of the calibration trajectories: per step (x [N, C, H, W], t), the time groups and, for
    conditioned models, the seeds' conditioning rows [N, ...], the unconditional row [1, ...] and the guidance."""

    steps: list[tuple[torch.Tensor, float]]
    groups: TimeGroups
    rows: Cond | None = None
    uncond: Cond | None = None
    guidance_scale: float = 1.0


def trajectory_inputs(den: Denoiser, seeds: int) -> CalibInputs:
    """The inputs of ``seeds`` DDIM trajectories of ``STEPS`` steps (conditioned models: seed i takes class or
    prompt row 1 + i mod P and the architecture's guidance, as the generate stage does), ``GROUPS`` time groups."""
    cond = prompt_rows(seeds, den.conditioning(None, [], guidance_scale(params_from_dict({}), den))) \
        if den.conditional else None
    steps: list[tuple[torch.Tensor, float]] = []
    sched = make_scheduler("ddim", den.scheduler_config, den.scheduler_class)
    sample(den, sched, list(range(seeds)), steps=STEPS, batch_size=seeds, cond=cond,
           record=lambda i, t, x: steps.append((x.clone(), float(t))), desc="calibration trajectories")
    groups = TimeGroups.from_schedule([t for _, t in steps], GROUPS)
    if cond is None:
        return CalibInputs(steps, groups)
    return CalibInputs(steps, groups, cond.per_seed(), cond.unconditional(), cond.guidance_scale)


def calibrate(den: Denoiser, params: Params, calib: CalibInputs, codes: IntegerCodes
              ) -> tuple[nn.Module, QState, int]:
    """A copy of ``den``'s network with the attention matmuls and glue sites of ``params`` installed (float), and its
    quantizer state fitted the product's way (:func:`~pqd.diffusion.qconfig.calibrate_network`) on every step of
    ``calib`` with the integer ``codes``, without reconstruction (speed does not depend on it); and the number of
    glue sites."""
    bits = params.quant.weight_bits

    def step(net: nn.Module, x: torch.Tensor, t: float) -> None:
        dataclasses.replace(den, net=net, time_groups=None).guided(x, torch.tensor(t), calib.rows, calib.uncond,
                                                                    calib.guidance_scale)

    @torch.no_grad()
    def forward_all(net: nn.Module, set_group) -> None:
        for x, t in tqdm(calib.steps, desc=f"observing (W{bits}{', glue' if params.quant.glue else ''})"):
            set_group(int(calib.groups.group_of(t)))
            step(net, x, t)

    fit = calibrate_network(params, den, codes, forward_all, lambda net: step(net, *calib.steps[0]))
    return fit.net, fit.state, len(fit.glue)


def weights_label(bits: int, state: QState) -> str:
    """'W8', or 'W8 (7-bit codes)' when the stored codes of the body layers are narrower than ``bits``."""
    code = Counter(lp.weight_bits for lp in weight_layers(state).values()).most_common(1)[0][0]
    return f"W{bits}" if code == bits else f"W{bits} ({code}-bit codes)"


def export(model: BenchModel, net: nn.Module, state: QState, groups: TimeGroups, out: Path) -> Path:
    """The calibration written the product's way: export folder, then ONNX traced from what the loader rebuilds."""
    out.mkdir(parents=True)
    write_export(model.folder, net, state, groups, out, float_dtype=torch.float32)
    deploy.write_onnx(load_quantized_net(out, verify=False), groups, model.den, out / deploy.ONNX_DIR)
    return out


def float_onnx(den: Denoiser, path: Path) -> Path:
    """The float network's graph: the same named inputs as the deployed ones (sample, timestep, conditioning)."""
    path.write_bytes(deploy.export_net(den.net, den))
    return path


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def yardstick_feeds(calib: CalibInputs, batches: int = 4) -> list[dict[str, np.ndarray]]:
    """The calibration feeds of both yardsticks: ``batches`` steps spread over the calibration trajectories
    (conditional branch)."""
    picked = calib.steps[::max(1, len(calib.steps) // batches)][:batches]
    return [deploy.graph_feeds(x, torch.tensor(t), calib.rows) for x, t in picked]


def ort_static_reference(fp_path: Path, calib: CalibInputs, out: Path, reduce_range: bool, batches: int = 4) -> Path:
    """onnxruntime's own static QDQ quantization of the float graph (u8 activations, s8 per-channel weights, 7-bit
    with ``reduce_range``, every op it supports in int8), calibrated on ``batches`` steps spread over the calibration
    trajectories (conditional branch): not a PQD artifact, a yardstick for what integer kernels give on this CPU."""
    reader = _Feeds(yardstick_feeds(calib, batches))
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range)
    return out


def nncf_reference(fp_path: Path, calib: CalibInputs, out: Path, batches: int = 4) -> Path:
    """NNCF's post-training quantization of the float graph for OpenVINO (``nncf.quantize`` with its defaults, the
    call optimum-intel makes), calibrated on the same steps as :func:`ort_static_reference`: OpenVINO's own int8
    yardstick, saved as OpenVINO IR (``out``: an .xml path)."""
    import nncf
    import openvino as ov

    feeds = yardstick_feeds(calib, batches)
    quantized = nncf.quantize(ov.Core().read_model(str(fp_path)), nncf.Dataset(feeds), subset_size=len(feeds))
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def sizes(den: Denoiser, exports: dict[str, Path], tmp: Path) -> dict[str, int]:
    """Bytes of the fp32 network (safetensors) and of each export's quantized safetensors and ONNX files, by label."""
    fp = tmp / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in den.net.state_dict().items()}, fp)
    out = {"fp32 safetensors": fp.stat().st_size}
    for label, d in exports.items():
        out[f"{label} export safetensors"] = quantized_weights_file(d).stat().st_size
        onnx_files = list((d / deploy.ONNX_DIR).iterdir())
        out[f"{label} ONNX (weights.bin + {len(onnx_files) - 1} graphs)"] = sum(p.stat().st_size for p in onnx_files)
    return out
