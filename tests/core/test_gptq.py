"""Error-compensating rounding (pqd.core.gptq): the layer's output error on its own inputs, the grid, the start of
AdaRound, and the calibration recipe's use of it."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.core.adaround import START_MARGIN, AdaRound
from pqd.core.affine import weight_values
from pqd.core.gptq import Hessian, gptq_codes, input_hessian, layer_rows
from pqd.core.modules import quant_layers
from pqd.core.qtypes import weight_qtype
from pqd.core.quantize import QuantConfig, apply_qstate, fit_qstate, quantize_weight
from pqd.core.reconstruct import ReconConfig, UnitBatch, reconstruct_unit, unit_mse


def correlated(n, d, seed=0):
    """Inputs whose channels are correlated (as a layer's inputs are), so rounding errors can cancel."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    return torch.randn(n, d, generator=g) @ mix


def output_mse(layer_w, codes, scale, x):
    w = layer_w.reshape(len(layer_w), -1)
    q = weight_values(codes, scale).reshape(len(layer_w), -1)
    return float((x @ (q - w).T).pow(2).mean())


@pytest.mark.parametrize("bits,group_size", [(4, 0), (8, 0), (4, 32)])
def test_gptq_lowers_the_layer_output_error_of_nearest_rounding(bits, group_size):
    """On per-channel scales and on a scale per 32 input channels (each column rounded on its own group's grid)."""
    torch.manual_seed(bits)
    layer = nn.Linear(96, 48)
    x = correlated(2048, 96)
    h = Hessian(layer)
    h.update(x[:1024])
    h.update(x[1024:])
    nearest, scale = quantize_weight(layer.weight, bits, "mse", group_size)
    assert scale.shape == ((48, 3) if group_size else (48,))
    codes = gptq_codes(layer.weight, scale, h.value(), weight_qtype(bits))
    qt = weight_qtype(bits)
    assert codes.dtype == torch.int8 and codes.shape == nearest.shape
    assert int(codes.min()) >= qt.qmin and int(codes.max()) <= qt.qmax
    w = layer.weight.detach()
    assert output_mse(w, codes, scale, x) < 0.8 * output_mse(w, nearest, scale, x)


def test_with_uncorrelated_inputs_gptq_is_nearest_rounding():
    """A diagonal Hessian carries no error from one column to another: every code is the nearest one."""
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    codes, scale = quantize_weight(w, 4, "minmax")
    h = torch.diag(torch.rand(40) + 0.5)
    assert torch.equal(gptq_codes(w, scale, h, weight_qtype(4)), codes)


def test_conv_rows_are_the_patches_its_reshaped_weight_multiplies():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 3, 7, 7)
    rows = layer_rows(conv, x)
    y = (rows @ conv.weight.reshape(5, -1).T).reshape(2, -1, 5).permute(0, 2, 1)
    assert torch.allclose(y.reshape(2, 5, 4, 4), conv(x), atol=1e-5)


def test_on_low_rank_inputs_gptq_rounding_leaves_almost_no_output_error():
    # a DiT modulation linear's input is the conditioning embedding, one vector per (time step, class): a few
    # directions, so GPTQ can move the rounding error where no input goes
    torch.manual_seed(0)
    layer = nn.Linear(32, 64)
    x = torch.randn(256, 3) @ torch.randn(3, 32)
    net = nn.Sequential(nn.Identity(), layer)
    h = input_hessian(net, layer, lambda m: m(x))
    assert torch.allclose(h, x.T @ x / len(x), rtol=1e-4, atol=1e-4)
    near = quantize_weight(layer.weight, 4, "minmax")
    gptq = quantize_weight(layer.weight, 4, "minmax", hessian=h, damp=0.01)
    assert torch.equal(gptq[1], near[1]) and not torch.equal(gptq[0], near[0])  # same grid, other codes
    assert output_mse(layer.weight.detach(), *gptq, x) < 0.05 * output_mse(layer.weight.detach(), *near, x)
    assert len(layer._forward_pre_hooks) == 0


def test_a_hessian_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq_codes(torch.randn(4, 8), torch.ones(4), torch.eye(9), weight_qtype(4))


def test_adaround_started_from_codes_rounds_to_them_and_may_move_one_step():
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    nearest, s = quantize_weight(w, 4, "minmax")
    start = (nearest + torch.randint(-1, 2, nearest.shape)).clamp(-8, 7).to(torch.int8)  # codes off nearest
    ar = AdaRound(w, s, weight_qtype(4), start)
    assert torch.equal(ar.codes(), start)
    lo, hi = ar.floor, ar.floor + 1  # the two choices bracket the start code
    assert bool(((start >= lo) & (start <= hi)).all())


class Block(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(x)))


def test_the_recipe_with_gptq_rounding_lowers_the_block_error_and_reconstruction_keeps_it():
    torch.manual_seed(0)
    fp = Block()
    g = torch.Generator().manual_seed(1)
    mix = torch.eye(16) + 0.4 * torch.randn(16, 16, generator=g)
    xs = [torch.einsum("bchw,cd->bdhw", torch.randn(32, 16, 6, 6, generator=g), mix) for _ in range(3)]
    with torch.no_grad():
        batches = [UnitBatch((x,), {}, fp(x)) for x in xs]
    err = {}
    for rounding in ("nearest", "gptq"):
        cfg = QuantConfig(weight_bits=4, act_bits=8, rounding=rounding)
        q = apply_qstate(copy.deepcopy(fp), fit_qstate(fp, lambda m, sg: [m(x) for x in xs], cfg))
        err[rounding] = unit_mse(q, batches)
        if rounding == "gptq":
            weights = {n: fp.get_submodule(n).weight.detach() for n in quant_layers(q)}
            log = reconstruct_unit(q, weights, batches, ReconConfig(iters=300, qdrop_p=0.0, start_from_codes=True),
                                   torch.Generator().manual_seed(0))
            assert log["mse_before"] == pytest.approx(err["gptq"])
            # learnt rounding from GPTQ's codes improves on them (it is not reverted to them)
            assert log["reverted"] == 0.0 and log["mse_after"] < log["mse_before"], log
    assert err["gptq"] < err["nearest"]


def test_adaround_from_start_codes_begins_next_to_their_weights():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    s = w.abs().amax(dim=1) / 7
    start = (torch.round(w / s[:, None]) + torch.randint(-1, 2, w.shape)).clamp(-8, 7).to(torch.int8)
    ar = AdaRound(w, s, weight_qtype(4), start)
    gap = (ar.soft_weight() / s[:, None] - start.float()).abs()
    assert float(gap.max()) <= START_MARGIN + 1e-5  # not back at the float weights
