"""How the product quantizes a denoiser: the one place that turns ``quant.*`` / ``calibrate.*`` and a
:class:`~pqd.diffusion.adapter.Denoiser` into the core's configs, and the one calibration recipe
(:func:`calibrate_network`) that the calibrate stage and the benchmarks call alike.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from pqd.core.quantize import ForwardAll, QState, QuantConfig, apply_qstate, fit_qstate
from pqd.core.sharing import Group, share_qparams, shared_inputs, tie_quantizers
from pqd.core.modules import quantizable_layers
from pqd.core.reconstruct import ReconConfig
from pqd.diffusion.adapter import Denoiser
from pqd.diffusion.attention import use_matmul_attention
from pqd.diffusion.glue import glue_sites, install_sites, resampling_convs
from pqd.params import Params
from pqd.params.machine import IntegerCodes, code_bits, integer_codes


def quant_config(params: Params, den: Denoiser, attention: dict[str, str] | None = None,
                 codes: IntegerCodes | None = None) -> QuantConfig:
    """The QuantConfig of ``den`` under ``params``. ``attention``: the attention matmul modules by role (see
    pqd.diffusion.attention.use_matmul_attention); the softmax output (first operand of softmax·V) gets
    quant.softmax_bits. ``codes``: quant.reduce_range resolved (default: for this machine)."""
    reduce = (codes or integer_codes(params)).reduce_range
    names = list(quantizable_layers(den.net))
    q = params.quant
    edge = {n: code_bits(max(q.edge_bits, q.weight_bits), reduce) for n in den.edge_layers(names)}
    edge |= {n: code_bits(max(q.modulation_bits, q.weight_bits), reduce) for n in den.modulation_layers(names)}
    c = params.calibrate
    float_out = set(den.float_output_layers(names))
    return QuantConfig(weight_bits=code_bits(q.weight_bits, reduce), act_bits=q.act_bits,
                       weight_range=c.weight_range, act_range=c.act_range, act_samples=c.act_samples,
                       time_groups=c.time_groups, layer_weight_bits=edge,
                       splits=den.skip_splits() if c.split_shortcut else {},
                       output_layers=frozenset(n for n in names if n not in float_out) if q.outputs else frozenset(),
                       operand_bits={n: (q.softmax_bits if role == "pv" else q.act_bits, q.act_bits)
                                     for n, role in (attention or {}).items()},
                       smooth=frozenset(den.smooth_layers(names)) if q.smooth else frozenset(),
                       smooth_alpha=q.smooth_alpha, rounding=c.rounding, gptq_damp=c.gptq_damp,
                       weight_group_size=q.weight_group_size, act_symmetric=q.act_symmetric,
                       eight_bit_codes=code_bits(8, reduce))


def install_glue(params: Params, den: Denoiser) -> list[str]:
    """Give ``den``'s network the glue sites of quant.glue (float until a qstate is applied); returns their names."""
    return install_sites(den.net, glue_sites(den.net, params.quant.glue, den.skip_splits(),
                                              bool(params.calibrate.split_shortcut)))


def shared_groups(params: Params, den: Denoiser, cfg: QuantConfig, run_once: Callable[[nn.Module], object]
                  ) -> tuple[Group, ...]:
    """The quantizers of ``den``'s network (layer inputs and outputs, matmul operands, glue sites) that see one
    tensor in ``run_once`` (a forward pass) and share its grid under quant.share_grids (none when it is off);
    layers whose input ``cfg`` splits keep their own."""
    if not params.quant.share_grids:
        return ()
    return shared_inputs(den.net, run_once, exclude=cfg.splits, outputs=cfg.output_layers,
                         through=resampling_convs(den.net))


def install_attention(params: Params, den: Denoiser) -> dict[str, str]:
    """Give ``den``'s attention modules replaceable matmuls where quant.attention is set; returns the matmul modules
    by role (what :func:`quant_config` takes as ``attention``), empty when it is not."""
    return use_matmul_attention(den.net) if params.quant.attention else {}


@dataclass
class Calibration:
    """What :func:`calibrate_network` fitted. ``net``: a copy of the denoiser's network with the attention matmuls
    and glue sites installed, still float (what the exporter writes and reconstruction matches); ``shared``: the
    groups as :func:`~pqd.core.sharing.share_qparams` returned them."""

    net: nn.Module
    state: QState
    config: QuantConfig
    shared: tuple[Group, ...]
    glue: list[str]
    attention: dict[str, str]

    def quantized(self) -> nn.Module:
        """A copy of ``net`` with ``state`` applied, each shared grid on one quantizer (what reconstruction learns)."""
        q = apply_qstate(copy.deepcopy(self.net), self.state)
        tie_quantizers(q, self.shared)
        return q


def calibrate_network(params: Params, den: Denoiser, codes: IntegerCodes, forward_all: ForwardAll,
                      run_once: Callable[[nn.Module], object],
                      fitted: Callable[[Callable[[], QState]], QState] = lambda fit: fit(),
                      promoted: dict[str, int] | None = None) -> Calibration:
    """The product's calibration recipe (without reconstruction), on a copy of ``den``'s network: attention's
    matmuls, then the glue sites (the export loader's order); the shared grids found in ``run_once`` (one forward
    pass of the network it is given); every quantizer fitted over ``forward_all`` (the calibration set), then the
    shared grids agreed. ``fitted(fit)`` returns the fitted state: ``fit()``'s, or the same kept from an earlier
    run (the calibrate stage's checkpoint). ``promoted``: layers given other weight bits (mixed precision,
    pqd.diffusion.mixed)."""
    work = dataclasses.replace(den, net=copy.deepcopy(den.net))
    attention = install_attention(params, work)
    glue = install_glue(params, work)
    cfg = quant_config(params, work, attention, codes)
    if promoted:
        cfg = dataclasses.replace(cfg, layer_weight_bits={**cfg.layer_weight_bits, **promoted})
    shared = shared_groups(params, work, cfg, run_once)
    state, shared = share_qparams(fitted(lambda: fit_qstate(work.net, forward_all, cfg)), shared)
    return Calibration(work.net, state, cfg, shared, glue, attention)


def recon_config(params: Params) -> ReconConfig:
    c = params.calibrate
    return ReconConfig(iters=c.recon_iters, batch_size=c.recon_batch_size, lr_round=c.lr_round, lr_act=c.lr_act,
                       round_weight=c.round_weight, qdrop_p=c.qdrop_p, adaround=c.adaround, lsq=c.lsq,
                       start_from_codes=c.rounding == "gptq")
