"""Block reconstruction: AdaRound weights, LSQ activation steps and QDrop, one implementation for every unit.

A *unit* is any module holding quantized layers (a ResNet or attention block, a single layer). Given its recorded
inputs and the FP outputs, its rounding (per weight) and activation steps (per time group) minimise the output MSE
plus the AdaRound regulariser, each activation kept in float at random with probability ``qdrop_p`` (QDrop).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, MutableSequence, Sequence

import torch
import torch.nn as nn

from pqd.core.adaround import AdaRound, beta_schedule
from pqd.core.guards import NumericalError
from pqd.core.modules import ActQuantizer, act_quantizers, quant_layers, set_time_group


@dataclass(frozen=True)
class ReconConfig:
    iters: int = 300
    batch_size: int = 32
    lr_round: float = 1e-2  # Adam on the AdaRound variables
    lr_act: float = 1e-3  # Adam on the activation step sizes (LSQ)
    round_weight: float = 0.01  # weight of the rounding regulariser
    warmup: float = 0.2  # share of iterations without the regulariser
    qdrop_p: float = 0.5  # probability of keeping an activation element in float during reconstruction
    adaround: bool = True
    lsq: bool = True
    start_from_codes: bool = False  # AdaRound starts from the fitted codes (GPTQ's), not from the float weights


@dataclass
class UnitBatch:
    """One recorded call of a unit: its positional/keyword inputs, the FP target output, the time group."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: torch.Tensor
    group: int = 0


class RecordedBatches(Sequence[UnitBatch]):
    """A unit's recorded calls, assembled on access from its inputs, FP targets and time groups (which may
    live in any sequence, e.g. one that keeps each item in a file)."""

    def __init__(self, inputs: Sequence[tuple[tuple, dict]], targets: Sequence[torch.Tensor], groups: list[int]) -> None:
        self.inputs, self.targets, self.groups = inputs, targets, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> UnitBatch:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        args, kwargs = self.inputs[i]
        return UnitBatch(args, kwargs, self.targets[i], self.groups[i])


# where a unit's recordings go: a fresh growable sequence per (unit, 'in' | 'out'); a plain list keeps them
# in memory, a caller bounds memory by returning one that keeps each item elsewhere (the calibrate stage: files)
StoreFactory = Callable[[str, str], MutableSequence[Any]]


@contextlib.contextmanager
def qdrop(module: nn.Module, p: float, generator: torch.Generator) -> Iterator[None]:
    """Within the block, every activation quantizer of ``module`` keeps each element in float with prob. p,
    drawing from ``generator`` (on the module's device)."""
    qs = act_quantizers(module)
    old = [(q.drop_prob, q.drop_generator) for q in qs]
    for q in qs:
        q.drop_prob, q.drop_generator = p, generator
    try:
        yield
    finally:
        for q, (o, g) in zip(qs, old):
            q.drop_prob, q.drop_generator = o, g


def _output(y: Any) -> torch.Tensor:
    """The tensor a unit returns (diffusers blocks return a tensor, a tuple or an output object). A unit that
    returns several tensors (SD3's joint blocks: the context and the image tokens) is judged on all of them:
    their rows flattened and concatenated, [B, N1 + N2 + ...]."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, (tuple, list)):
        parts = [t for t in y if isinstance(t, torch.Tensor)]
        if not parts:
            raise TypeError("unit output holds no tensor")
        return parts[0] if len(parts) == 1 else torch.cat([t.flatten(1) for t in parts], dim=1)
    if hasattr(y, "sample"):
        return y.sample
    raise TypeError(f"unit output of type {type(y).__name__} is not supported")


def _select(v: Any, idx: torch.Tensor, n: int) -> Any:
    """Rows ``idx`` of a batch-leading tensor of length n; other values unchanged."""
    return v[idx] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v


@torch.no_grad()
def unit_mse(unit: nn.Module, batches: Sequence[UnitBatch]) -> float:
    """Mean squared error of the unit's output against the targets (no QDrop)."""
    se, n = 0.0, 0
    for b in batches:
        set_time_group(unit, b.group)
        y = _output(unit(*b.args, **b.kwargs))
        se += float((y - b.target).pow(2).sum())
        n += b.target.numel()
    return se / max(1, n)


def reconstruct_unit(unit: nn.Module, float_weights: dict[str, torch.Tensor], batches: Sequence[UnitBatch],
                     cfg: ReconConfig, generator: torch.Generator) -> dict[str, float]:
    """Optimise the unit's rounding and activation steps in place; returns a log of the losses. ``float_weights``:
    each quantized layer's float weight, by name in the unit. A result worse than the fitted codes (nearest or GPTQ
    rounding) on the recorded inputs is reverted to those codes and the initial steps (the log says so)."""
    layers = quant_layers(unit)
    # LSQ learns the step sizes of grids up to 8 bits; a wider grid (a 16-bit softmax output) has a rounding
    # error far below anything learning could fix, and Adam's steps of ~lr_act would dwarf its tiny step size
    aqs: list[ActQuantizer] = [a for a in act_quantizers(unit) if a.qtype.bits <= 8]
    before = unit_mse(unit, batches)
    if cfg.iters == 0 or not (cfg.adaround or cfg.lsq):  # nothing to learn: the unit stays as fitted
        return {"mse_before": before, "mse_after": before, "reverted": 0.0}
    saved_codes = {n: q.weight_int.clone() for n, q in layers.items()}
    saved_scales = [a.scale.detach().clone() for a in aqs]
    params: list[dict[str, Any]] = []
    if cfg.adaround:
        for n, q in layers.items():
            start = q.weight_int if cfg.start_from_codes else None
            q.rounding = AdaRound(float_weights[n], q.weight_scale, q.wqtype, start).to(q.weight_int.device)
        params.append({"params": [q.rounding.V for q in layers.values()], "lr": cfg.lr_round})
    if cfg.lsq:
        for a in aqs:
            a.scale.requires_grad_(True)
        # quantizers of one tensor hold one step (pqd.core.sharing): each parameter once
        params.append({"params": list({id(a.scale): a.scale for a in aqs}.values()), "lr": cfg.lr_act})
    opt = torch.optim.Adam(params)
    rec_loss = torch.tensor(0.0)
    # QDrop's masks come from a generator on the unit's device, seeded from ``generator``
    device = batches[0].target.device
    drop_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    try:
        with torch.enable_grad(), qdrop(unit, cfg.qdrop_p, drop_gen):
            for it in range(cfg.iters):
                bi = int(torch.randint(len(batches), (1,), generator=generator))
                b = batches[bi]
                n = len(b.target)
                idx = torch.randperm(n, generator=generator)[: cfg.batch_size].to(b.target.device)
                set_time_group(unit, b.group)
                y = _output(unit(*[_select(a, idx, n) for a in b.args], **{k: _select(v, idx, n) for k, v in b.kwargs.items()}))
                rec_loss = (y - b.target[idx]).pow(2).mean()
                loss = rec_loss
                beta = beta_schedule(it, cfg.iters, cfg.warmup)
                if cfg.adaround and beta is not None:
                    loss = loss + cfg.round_weight * sum(q.rounding.regularizer(beta) for q in layers.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for a in aqs:  # keep step sizes positive
                    a.scale.data.clamp_(min=1e-8)
        hard = min((q.rounding.hard_fraction() for q in layers.values()), default=1.0) if cfg.adaround else 1.0
    finally:
        for q in layers.values():
            if q.rounding is not None:
                q.set_codes(q.rounding.codes())
                q.rounding = None
        for a in aqs:
            a.scale.requires_grad_(False)
    after = unit_mse(unit, batches)
    reverted = 0.0
    if not after <= before:  # never leave a unit worse than its fitted codes
        for n, q in layers.items():
            q.set_codes(saved_codes[n])
        for a, scale in zip(aqs, saved_scales):
            a.scale.data.copy_(scale)
        after, reverted = before, 1.0
    return {"mse_before": before, "mse_after": after, "reverted": reverted, "last_batch_loss": float(rec_loss.detach()),
            "hard_rounding_fraction": hard}


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


# runs calibration batch i through a model
BatchRunner = Callable[[nn.Module, int], None]


def _run_hooked(model: nn.Module, units: list[str], register: Callable[[nn.Module, str], Any], run: BatchRunner) -> None:
    """Run calibration batch 0 through ``model`` with ``register(module, unit)``'s hook on every unit."""
    handles = [register(model.get_submodule(u), u) for u in units]
    try:
        with torch.no_grad():
            run(model, 0)
    finally:
        for h in handles:
            h.remove()


def forward_order(model: nn.Module, units: list[str], run: BatchRunner) -> list[str]:
    """``units`` sorted by when a forward pass (calibration batch 0) first enters them."""
    seen: list[str] = []
    _run_hooked(model, units, lambda m, u: m.register_forward_pre_hook(
        lambda *_a: seen.append(u) if u not in seen else None), run)
    missing = [u for u in units if u not in seen]
    if missing:
        raise RuntimeError(f"reconstruction unit {missing[0]} is never called by the model's forward pass")
    return seen


def unit_io_bytes(model: nn.Module, units: list[str], run: BatchRunner) -> dict[str, int]:
    """Bytes of each unit's tensor inputs + output on calibration batch 0: what reconstruction records
    per batch for it (its memory peak is that of the unit with the most)."""
    size: dict[str, int] = {}

    def hook(u: str, args: tuple, kwargs: dict, out: Any) -> None:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)] + [_output(out)]
        size.setdefault(u, sum(a.numel() * a.element_size() for a in tensors))

    _run_hooked(model, units, lambda m, u: m.register_forward_hook(
        lambda _m, a, k, o: hook(u, a, k, o), with_kwargs=True), run)
    return size


@torch.no_grad()
def _capture(model: nn.Module, unit: str, run: BatchRunner, n_batches: int, groups: list[int],
             want: str, got: MutableSequence[Any]) -> MutableSequence[Any]:
    """Per calibration batch, the unit's inputs (``want='in'``: (args, kwargs)) or output (``'out'``),
    appended to ``got``."""

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                    {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        raise _Stop

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        got.append(_output(out).detach())
        raise _Stop

    mod = model.get_submodule(unit)
    h = mod.register_forward_pre_hook(pre, with_kwargs=True) if want == "in" else \
        mod.register_forward_hook(post, with_kwargs=True)
    try:
        for i in range(n_batches):
            set_time_group(model, groups[i])
            try:
                run(model, i)
            except _Stop:
                pass
    finally:
        h.remove()
    if len(got) != n_batches:
        raise RuntimeError(f"unit {unit} was called {len(got)} times for {n_batches} calibration batches")
    return got


@dataclass
class UnitJob:
    """One unit's reconstruction, self-contained (it can travel to another process): a copy of the quantized
    unit, its layers' float weights, its recorded calls, the config and its own seed."""

    unit: str
    module: nn.Module
    weights: dict[str, torch.Tensor]
    batches: Sequence[UnitBatch]
    cfg: ReconConfig
    seed: int


# a finished unit: its state (state_dict of the quantized unit) and its log entry
UnitResult = tuple[dict[str, torch.Tensor], dict[str, Any]]


def unit_seed(seed: int, unit: str) -> int:
    """The seed of one unit's batch sampling and QDrop masks: fixed by (seed, unit name), so a unit draws the same
    numbers whichever units ran before it, in whatever process."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{unit}".encode()).digest()[:8], "little") >> 1


def run_unit(job: UnitJob, device: str | None = None) -> UnitResult:
    """Reconstruct ``job``'s unit (on ``device``, default where it is) and return its state and log entry."""
    unit = job.module if device is None else job.module.to(device)
    move = (lambda v: v) if device is None else (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
    batches: Sequence[UnitBatch] = job.batches if device is None else [
        UnitBatch(tuple(move(a) for a in b.args), {k: move(v) for k, v in b.kwargs.items()}, move(b.target), b.group)
        for b in job.batches]
    weights = {k: move(w) for k, w in job.weights.items()}
    t0 = time.perf_counter()
    entry = reconstruct_unit(unit, weights, batches, job.cfg, torch.Generator().manual_seed(job.seed))
    entry["seconds"] = time.perf_counter() - t0
    return {k: v.detach().cpu() for k, v in unit.state_dict().items()}, entry


class _Inline:
    """The executor of a serial run: ``submit`` runs the job at once in this process."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(fn(*args))
        return fut


def waves(order: list[str], inputs: str, wave: int) -> list[list[str]]:
    """The units (in forward order) grouped into waves whose inputs are recorded before any of them is reconstructed:
    with ``inputs='float'`` one wave (every unit learns from the FP model's inputs), with ``'quantized'`` runs of
    ``wave`` consecutive units (1: each unit sees every unit before it reconstructed, the sequential method)."""
    if inputs == "float":
        return [order]
    return [order[i:i + wave] for i in range(0, len(order), wave)]


def reconstruct_model(fp: nn.Module, q: nn.Module, units: list[str], run: BatchRunner, groups: list[int],
                      cfg: ReconConfig, seed: int = 0, progress: bool = True,
                      store: StoreFactory = lambda _unit, _kind: [], *, inputs: str = "quantized", wave: int = 1,
                      saved: Callable[[str], UnitResult | None] = lambda _u: None,
                      finished: Callable[[str, UnitResult], None] = lambda _u, _r: None,
                      executor: Any = None, concurrency: int = 1) -> list[dict[str, Any]]:
    """Reconstruct every unit of the quantized model ``q`` against the float model ``fp``, wave by wave
    (:func:`waves`).

    A unit learns from its inputs as ``q`` (``inputs='quantized'``: with every earlier wave reconstructed) or ``fp``
    (``'float'``) feeds them, and the outputs ``fp``'s unit gives on ``fp``'s own inputs. ``groups[i]``: the time
    group of calibration batch i. A unit's recordings go to ``store(unit, 'out' | 'in')`` and are released when its
    job is done. ``saved(unit)`` returns a unit's result from an earlier run (then it is not recomputed);
    ``finished(unit, result)`` gets each new result as it arrives. Jobs go to ``executor.submit(run_unit, job)``
    (default: this process, one at a time), at most ``concurrency`` in flight; a wave's results are loaded into
    ``q`` in forward order once all of them are in. Returns one log entry per unit, in forward order.
    """
    from tqdm.auto import tqdm

    if inputs not in ("quantized", "float") or wave < 1:
        raise ValueError(f"reconstruction inputs {inputs!r}, wave {wave}: expected 'quantized' or 'float', wave >= 1")
    remote = executor is not None
    executor = executor or _Inline()
    n = len(groups)
    order = forward_order(fp, units, run)
    log: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(order), desc="block reconstruction", disable=not progress) as bar:
        for group in waves(order, inputs, wave):
            results: dict[str, UnitResult] = {}
            pending: dict[str, concurrent.futures.Future] = {}

            def collect(block: bool) -> None:
                while pending and (block or len(pending) >= concurrency):
                    done = next((u for u, f in pending.items() if f.done()), None)
                    if done is None:
                        concurrent.futures.wait(pending.values(), return_when=concurrent.futures.FIRST_COMPLETED)
                        continue
                    results[done] = pending.pop(done).result()
                    if not math.isfinite(results[done][1]["mse_before"]):
                        raise NumericalError(f"reconstruction unit {done}: the quantized unit's output is non-finite "
                                             f"on the calibration inputs (time groups {sorted(set(groups))})")
                    finished(done, results[done])
                    bar.update()

            for unit in group:
                prior = saved(unit)
                if prior is not None:
                    results[unit] = prior
                    bar.update()
                    continue
                src = q if inputs == "quantized" else fp
                batches: Sequence[UnitBatch] = RecordedBatches(
                    _capture(src, unit, run, n, groups if src is q else [0] * n, "in", store(unit, "in")),
                    _capture(fp, unit, run, n, [0] * n, "out", store(unit, "out")), groups)
                q_unit, fp_unit = q.get_submodule(unit), fp.get_submodule(unit)
                # the float weights the codes stand for (a balanced layer's codes quantize weight x smooth)
                weights = {nm: ql.folded(fp_unit.get_submodule(nm).weight.detach())
                           for nm, ql in quant_layers(q_unit).items()}
                if remote:
                    # the recordings travel with the job (a store's files stay on this machine), and the job owns its
                    # tensors: a process pool moves a pickled tensor's storage into shared memory from its feeder
                    # thread, while this thread still runs the models on the storages a capture or a weight may
                    # share with them (the model's input, fp's weights); that race handed jobs garbage
                    batches = copy.deepcopy(list(batches))
                    weights = {nm: w.clone() for nm, w in weights.items()}
                collect(block=False)
                pending[unit] = executor.submit(run_unit, UnitJob(unit, copy.deepcopy(q_unit), weights, batches, cfg,
                                                                  unit_seed(seed, unit)))
                del batches  # this unit's recordings go with its job
            collect(block=True)
            for unit in group:  # the wave's results enter q together, in forward order
                state, entry = results[unit]
                q.get_submodule(unit).load_state_dict(state)
                log[unit] = {"unit": unit, "layers": len(quant_layers(q.get_submodule(unit))), **entry}
    return [log[u] for u in order]
