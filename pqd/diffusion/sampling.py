"""The denoising loop, written out: explicit per-seed randomness, optional recording of the network's inputs."""

from __future__ import annotations

from typing import Any, Callable, Collection

import torch
from tqdm.auto import tqdm

from pqd.core.guards import NumericalError, locate_nonfinite
from pqd.diffusion.adapter import Conditioning, Denoiser
from pqd.errors import ParamError

# called at every step with (step index, timestep value the network received, its input [B, C, H, W])
Recorder = Callable[[int, torch.Tensor, torch.Tensor], None]

SCHEDULERS = ("ddim", "ddpm", "keep")


def make_scheduler(kind: str, config: dict[str, Any], source_class: str):
    """Inference scheduler of ``kind`` built from the pipeline's scheduler config."""
    import diffusers

    name = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "keep": source_class}.get(kind)
    if name is None:
        raise ValueError(f"scheduler {kind!r} is not allowed: expected one of {', '.join(SCHEDULERS)}")
    if source_class.startswith("FlowMatch") and kind != "keep":  # a velocity model under a noise-prediction sampler
        raise ParamError(f"params: generate.scheduler = {kind!r} is not allowed for this flow-matching model "
                         f"({source_class}): expected 'keep'")
    return getattr(diffusers, name).from_config(config)


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Starting noise [len(seeds), *shape], float32: each sample from its own seed (batch-independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def checked_predict(den: Denoiser, x: torch.Tensor, t: torch.Tensor, where: str,
                    run: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """``den.predict(x, t)`` (or ``run()``, e.g. a guided prediction); non-finite output raises NumericalError
    naming ``where``, the timestep and the first layer that produced a non-finite value (found by re-running
    the step with hooks)."""
    run = run or (lambda: den.predict(x, t))
    eps = run()
    if not bool(torch.isfinite(eps).all()):
        ts = sorted({float(v) for v in torch.as_tensor(t).reshape(-1).tolist()}, reverse=True)
        when = f"timestep {ts[0]:g}" if len(ts) == 1 else f"timesteps {', '.join(f'{v:g}' for v in ts[:4])}"
        if isinstance(den.net, torch.nn.Module):
            where_in = f"first produced by layer {locate_nonfinite(den.net, run)}"
        else:  # a deployed graph (onnxruntime): no torch layers to hook
            where_in = f"in the {type(den).__name__} graph (evaluate the torch model to locate the layer)"
        raise NumericalError(f"non-finite UNet output at {where} ({when}): {where_in}; the quantized model overflows "
                             "there (try more activation bits or calibrate.act_range: mse)")
    return eps


@torch.no_grad()
def sample(den: Denoiser, scheduler, seeds: list[int], *, steps: int, eta: float = 0.0, batch_size: int = 256,
           device: str = "cpu", record: Recorder | None = None, progress: bool = True,
           desc: str = "sampling", cond: Conditioning | None = None,
           swap: tuple[Denoiser, Collection[int]] | None = None) -> torch.Tensor:
    """Sample one image per seed; returns images [N, C, H, W] float32 in [0, 1] (on CPU).

    Noise at every stochastic step also comes from per-seed generators, so a sample depends only on
    its seed, never on the batch it was drawn in. ``record`` sees each batch's network inputs (x before the
    classifier-free-guidance doubling). Conditioned models need ``cond`` (one prompt or class row per seed).
    ``swap = (other, steps)``: at those step indices (0 = the first, noisiest) ``other`` predicts instead of
    ``den``, with the same conditioning (e.g. a quantized model inside an FP trajectory, to see what one step's
    error does to the image).
    """
    if den.conditional != (cond is not None):
        raise ValueError(f"a {den.family} model samples {'with' if den.conditional else 'without'} conditioning")
    other, swapped = (swap[0], frozenset(swap[1])) if swap is not None else (den, frozenset())
    if other.conditional != den.conditional:
        raise ValueError(f"swap: a {other.family} model inside a {den.family} model's trajectory: expected both "
                         "with or both without conditioning")
    if bad := sorted(i for i in swapped if not 0 <= i < steps):
        raise ValueError(f"swap: step {bad[0]} is not allowed: expected step indices in 0..{steps - 1}")
    out = []
    starts = range(0, len(seeds), batch_size)
    with tqdm(total=len(starts) * steps, desc=desc, disable=not progress, unit="step") as bar:  # closed on errors too
        for start in starts:
            batch_seeds = seeds[start:start + batch_size]
            rows = uncond = None
            if cond is not None:
                rows = cond.subset(start, start + len(batch_seeds)).per_seed(device)
                uncond = cond.unconditional(device)
            scale = cond.guidance_scale if cond is not None else 1.0
            scheduler.set_timesteps(steps, device=device)
            # flow-matching schedulers (SD3) neither scale the noise nor the model input
            x = initial_noise(batch_seeds, den.sample_shape).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
            gens = [torch.Generator(device=device).manual_seed(int(s) + 1) for s in batch_seeds]
            for i, t in enumerate(scheduler.timesteps):
                x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
                if record is not None:
                    record(i, t, x_in)
                d = other if i in swapped else den
                eps = checked_predict(d, x_in, t, f"sampling step {i}",
                                      run=lambda d=d, x_in=x_in, t=t: d.guided(x_in, t, rows, uncond, scale))
                kwargs = {"eta": eta} if type(scheduler).__name__ == "DDIMScheduler" else {}
                x = scheduler.step(eps, t, x, generator=gens, **kwargs).prev_sample
                bar.update(1)
            out.append(den.to_images(x).cpu())
    return torch.cat(out)


def scheduler_from_protocol(protocol: dict[str, Any]):
    """Rebuild the exact inference scheduler recorded by the generate stage (class + config)."""
    import diffusers

    name = protocol["scheduler"]
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ValueError(f"scheduler {name!r} recorded in the FP samples is not a diffusers scheduler")
    return cls.from_config(protocol["scheduler_config"])
