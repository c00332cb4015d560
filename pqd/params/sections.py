"""The parameter sections, the schema of params.yaml: one frozen dataclass per section, every field a key that
params.yaml shows with its default, and every key there a field here. Loading: :mod:`pqd.params.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# the embedded demos (pqd.diffusion.demo): model sources trained on the spot, and FID reference sets
DEMO_SOURCES = ("demo:digits", "demo:digits16", "demo:digits-dit")
# first seeds of the FP sample sets: a (the evaluation seeds) and b (the noise floor's); the calibration
# trajectories start at generate.calib_seed_base, which must stay clear of both
SAMPLE_SEED_BASE = {"a": 0, "b": 500_000_000}
# glue between integer kernels that quant.glue can put on integer grids (pqd.diffusion.glue says where each sits)
GLUE_KINDS = ("residual", "temb", "silu", "concat", "attention")


@dataclass(frozen=True)
class ModelParams:
    """Where the full-precision model comes from (``model.*``)."""

    source: str = "demo:digits"  # demo:digits | demo:digits16 | demo:digits-dit | a local pipeline folder | a hub id org/name
    revision: str = "main"  # hub revision, only for hub ids
    seed: int = 0  # demo: UNet initialisation and training
    train_steps: int = 1200  # demo: UNet optimisation steps
    batch_size: int = 128  # demo: UNet training batch
    lr: float = 2e-3  # demo: UNet learning rate
    channels: tuple[int, ...] = (32, 64, 64)  # demo:digits: UNet block_out_channels
    dit_width: int = 128  # demo:digits-dit: transformer width (heads of 32 channels)
    dit_depth: int = 6  # demo:digits-dit: transformer blocks
    feature_epochs: int = 30  # demo: digit feature network epochs
    feature_seed: int = 0  # demo: digit feature network training (kept apart from seed: same features for every model)


@dataclass(frozen=True)
class GenerateParams:
    """Full-precision trajectories and samples (``generate.*``)."""

    scheduler: Literal["ddim", "ddpm", "keep"] = "ddim"  # keep = the pipeline's own scheduler class
    steps: int = 50
    eta: float = 0.0  # DDIM eta (0 = deterministic)
    calib_seeds: int = 64  # number of calibration trajectories
    calib_seed_base: int = 1_000_000_000  # their seeds: calib_seed_base, calib_seed_base + 1, ...
    eval_samples: int = 1000  # FP samples from the evaluation seeds (and as many again for the noise floor)
    batch_size: int = 250
    shard_size: int = 16  # calibration trajectories per safetensors shard
    prompts: str | None = None  # text-guided models: a file with one prompt per line (seeds take them in turn)
    # conditioned models: classifier-free guidance weight (1 = conditional branch only); None = the architecture's
    # protocol weight (pqd.diffusion.archs: SD 1.x 7.5, PixArt 4.5, SD3 7.0, DiT 1.5)
    guidance_scale: float | None = None


@dataclass(frozen=True)
class SelectParams:
    """Which trajectory inputs become the calibration set (``select.*``)."""

    # None = from the calibrate.method preset (pqd.params.methods)
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
    # weights of the edge layers: a UNet's first/last convolution and time embedding; a transformer's patch
    # embedding, final projection and timestep/text embeddings (never below weight_bits)
    edge_bits: int = 8
    modulation_bits: int = 8  # transformers' adaLN modulation linears (shift/scale/gate; never below weight_bits)
    # weights below 8 bits get a scale per group of this many input channels (0: one per output channel); 8-bit
    # layers keep per-channel scales (integer kernels). A grouped layer is weight-only when deployed
    weight_group_size: int = 0
    # average weight bits (codes and scales of every quantized layer) to spend: the layers below 8 bits whose
    # 4-bit error costs the network's output most move to 8 bits while the average stays within it (null: off)
    weight_bits_budget: float | None = None
    # quantize each layer's output too (but the last convolution's): integer kernels (onnxruntime's
    # QLinearConv/QLinearMatMul/QGemm) read and write uint8, so this is what the deployed model computes
    outputs: bool = True
    # 8-bit weights as 7-bit codes [-64, 63]: onnxruntime's u8s8 kernels saturate on x86 CPUs without VNNI/AMX with
    # full-range codes. auto decides from the calibrating machine's CPU flags (pqd.params.machine)
    reduce_range: Literal["auto", True, False] = "auto"
    # quantize attention's Q·Kᵀ and softmax·V matmuls too (both operands per tensor, per time group)
    attention: bool = True
    softmax_bits: int = 8  # grid of the softmax output (the first operand of softmax·V) when attention is quantized
    # balance the input channels of attention and feed-forward linears against their weights (SmoothQuant)
    smooth: bool = False
    smooth_alpha: float = 0.5  # share of the activation range moved into the weights
    # glue between integer kernels on integer grids too (any of GLUE_KINDS), so onnxruntime runs integer kernels there
    glue: tuple[str, ...] = GLUE_KINDS
    # layers (and glue sites) that read the same tensor share one input grid: one QuantizeLinear of it in the
    # deployed graph, as onnxruntime's own quantizer has (pqd.core.sharing)
    share_grids: bool = True
    # every activation grid without an offset: zero point 0 for a tensor that never goes below 0, else the middle code
    # (a signed int8 grid with zero point 0 in the deployed graph), so no runtime subtracts a zero point in float
    act_symmetric: bool = True
    # fold an orthogonal rotation per head into attention's value and output projections (exact: the float network
    # computes the same function), so the output projection's weights and inputs have smaller peaks (pqd.core.rotate)
    rotate: Literal["none", "hadamard"] = "none"


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
    recon_inputs: Literal["quantized", "float"] = "quantized"  # whose inputs a unit learns from: the quantized or FP model's
    recon_wave: int = 1  # quantized inputs: consecutive units recorded together, then reconstructed concurrently
    rounding: Literal["nearest", "gptq"] = "nearest"  # weight codes before reconstruction: nearest or GPTQ
    gptq_damp: float = 0.01  # GPTQ: share of the mean Hessian diagonal added to the diagonal
    sensitivity_samples: int = 256  # quant.weight_bits_budget: calibration samples the layer sensitivities run on
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
    reference: str = "demo:digits"  # demo:digits | demo:digits16 | a folder of images | a .npz with mu and sigma
    batch_size: int = 250
    grid_size: int = 64  # images per side of the FP-vs-quantized grid
    # onnxruntime | openvino: the FID of the deployed ONNX artifact in that runtime (the simulated torch model is
    # measured beside it); torch: the simulated model only
    backend: Literal["torch", "onnxruntime", "openvino"] = "onnxruntime"
    bootstrap: int = 1000  # resamples of the evaluation seeds for the intervals (0: no intervals)
    bootstrap_seed: int = 0  # seed of the resampling
    confidence: float = 0.95  # level of the intervals


@dataclass(frozen=True)
class ReleaseParams:
    """The release gate's thresholds (``release.*``): each judges an interval of evaluate.json against the model's
    own numbers (pqd.ops.release); the defaults come from make bench (docs/operations.md)."""

    delta_fid_fraction: float = 0.25  # ΔFID's upper bound at most this fraction of FID(FP, reference)
    fid_vs_fp_fraction: float = 0.1  # FID(quantized, FP)'s upper bound at most this fraction of the noise floor
    psnr_margin_db: float = 20.0  # mean PSNR's lower bound at least this many dB above FP images of other seeds


@dataclass(frozen=True)
class ParallelParams:
    """Where the generate and evaluate stages sample and calibrate reconstructs units (``parallel.*``): in the
    stage's process, or as tasks on a Dask cluster. Results do not depend on it (same bytes at the same torch
    thread count), so no stage lists it in dvc.yaml."""

    scheduler: str = "none"  # none | local (a LocalCluster of `workers`) | tcp://host:port of a running scheduler
    workers: int = 2  # local: worker processes (one per GPU on a multi-GPU box)
    threads_per_worker: int = 1  # torch threads of each worker, which runs one seed range at a time


@dataclass(frozen=True)
class CheckpointParams:
    """Where calibrate keeps each finished reconstruction unit, so a killed run resumes (``checkpoint.*``).
    Results do not depend on it (a resumed run writes the same bytes), so no stage lists it in dvc.yaml."""

    dir: str | None = ".pqd/checkpoints"  # relative to the project root; null: no checkpoints
    keep_mb: int = 0  # after a completed stage: 0 removes its checkpoint; N keeps recent ones up to N MB in all


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
    parallel: ParallelParams = field(default_factory=ParallelParams)
    checkpoint: CheckpointParams = field(default_factory=CheckpointParams)
