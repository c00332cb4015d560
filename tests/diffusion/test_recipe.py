"""The calibration recipe (pqd.diffusion.qconfig.calibrate_network), the one the calibrate stage and bench-deploy
call: it works on a copy of the network only, fits every quantizer, and gives what the steps written out by hand
give."""

import copy
import dataclasses
import threading

import pytest
import torch

from pqd.core.modules import MatMul, Site, matmul_modules, quant_layers, quant_matmuls, quant_sites, quantizable_layers
from pqd.core.quantize import fit_qstate
from pqd.core.sharing import share_qparams
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.attention import MatMulAttention
from pqd.diffusion.qconfig import calibrate_network, install_attention, install_glue, quant_config, shared_groups
from pqd.params import integer_codes, params_from_dict

GLUE_ATTENTION_SHARED = {"quant": {"attention": True, "softmax_bits": 8, "share_grids": True,
                                   "glue": ["concat", "residual", "silu", "attention"]},
                         "calibrate": {"method": "minmax", "time_groups": 2, "act_samples": 2000,
                                       "split_shortcut": False}}


class Uncopyable(torch.nn.Module):
    """A stand-in autoencoder that refuses to be deep-copied (a lock cannot be): the recipe must never copy it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(1, 1, 1)
        self.lock = threading.Lock()


@pytest.fixture(scope="module")
def den(tiny_pipeline):
    return dataclasses.replace(load_denoiser(tiny_pipeline), decoder=Uncopyable())


def batches(den):
    """Two time groups of calibration inputs with different ranges."""
    g = torch.Generator().manual_seed(0)
    return [(k, torch.randn(4, *den.sample_shape, generator=g) * s, torch.full((4,), t))
            for k, s, t in ((0, 2.0, 80.0), (1, 0.5, 20.0))]


def passes(den):
    """The recipe's two callables: a forward pass over the calibration set, and one forward pass."""
    data = batches(den)

    @torch.no_grad()
    def forward_all(net, set_group):
        for k, x, t in data:
            set_group(k)
            den.call(net, x, t)

    return forward_all, torch.no_grad()(lambda net: den.call(net, data[0][1], data[0][2]))


def by_hand(params, den):
    """The recipe written out: attention, then glue, on a copy of the network; config; groups; fit; shared grids."""
    work = dataclasses.replace(den, net=copy.deepcopy(den.net))
    attention = install_attention(params, work)
    glue = install_glue(params, work)
    cfg = quant_config(params, work, attention, integer_codes(params))
    forward_all, run_once = passes(den)
    shared = shared_groups(params, work, cfg, run_once)
    state, shared = share_qparams(fit_qstate(work.net, forward_all, cfg), shared)
    return work.net, state, cfg, shared, glue, attention


def same_state(a, b) -> bool:
    def same(x, y):
        return torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y

    return list(a) == list(b) and all(type(a[n]) is type(b[n]) and
                                      all(same(getattr(a[n], f.name), getattr(b[n], f.name))
                                          for f in dataclasses.fields(a[n])) for n in a)


def test_recipe_fits_a_copy_of_the_network_only(den):
    params = params_from_dict(GLUE_ATTENTION_SHARED)
    before = {k: v.clone() for k, v in den.net.state_dict().items()}
    forward_all, run_once = passes(den)
    fit = calibrate_network(params, den, integer_codes(params), forward_all, run_once)
    # the float denoiser is left as it was: no sites, no matmuls, diffusers' own attention, the same weights
    assert fit.net is not den.net and den.decoder is not None
    assert not any(isinstance(m, (Site, MatMul, MatMulAttention)) for m in den.net.modules())
    assert all(torch.equal(v, before[k]) for k, v in den.net.state_dict().items())
    assert not any(p.data_ptr() == q.data_ptr() for p in den.net.parameters() for q in fit.net.parameters())
    # the copy holds the sites and matmuls it was fitted with, still float, and the state covers every quantizer
    assert fit.glue and fit.attention and fit.shared
    assert set(fit.attention) == set(matmul_modules(fit.net))
    assert set(fit.state) == set(quantizable_layers(fit.net)) | set(fit.attention) | set(fit.glue)
    # ... which is what the steps written out by hand give
    net, state, cfg, shared, glue, attention = by_hand(params, den)
    assert same_state(fit.state, state)
    assert (fit.config, fit.shared, fit.glue, fit.attention) == (cfg, shared, glue, attention)
    assert [n for n, _ in fit.net.named_modules()] == [n for n, _ in net.named_modules()]


def test_quantized_twin_is_a_new_copy_with_the_state_and_one_grid_per_group(den):
    params = params_from_dict(GLUE_ATTENTION_SHARED)
    forward_all, run_once = passes(den)
    fit = calibrate_network(params, den, integer_codes(params), forward_all, run_once)
    q = fit.quantized()
    assert q is not fit.net and not quant_layers(fit.net)  # the float copy stays float
    assert set(quant_layers(q)) | set(quant_matmuls(q)) | set(quant_sites(q)) == set(fit.state)
    assert fit.quantized() is not q
    # tied: each group's members hold their lead's step (the same parameter object), as reconstruction needs
    owners = {**quant_layers(q), **quant_matmuls(q)}
    attrs = {"in": "act", "out": "out", "a": "qa", "b": "qb"}

    def step(name, side):
        site = quant_sites(q).get(name)
        return (site if site is not None and side == "in" else getattr(owners[name], attrs[side])).scale

    assert all(step(*member) is step(*lead) for lead, *members in fit.shared for member in members)


def test_recipe_without_glue_or_attention_installs_nothing(den):
    params = params_from_dict({"calibrate": {"method": "minmax", "time_groups": 2, "act_samples": 2000},
                               "quant": {"glue": [], "attention": False, "share_grids": False}})
    forward_all, run_once = passes(den)
    fit = calibrate_network(params, den, integer_codes(params), forward_all, run_once)
    assert (fit.glue, fit.attention, fit.shared) == ([], {}, ())
    assert set(fit.state) == set(quantizable_layers(den.net))
    assert [n for n, _ in fit.net.named_modules()] == [n for n, _ in den.net.named_modules()]
