"""Mixed precision on a denoiser (pqd.diffusion.mixed): the sensitivities it measures follow calibrate.rounding."""

import pytest
import torch

from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.mixed import mixed_precision
from pqd.diffusion.qconfig import quant_config
from pqd.params import integer_codes, params_from_dict


@pytest.fixture(scope="module")
def den(tiny_pipeline):
    return load_denoiser(tiny_pipeline)


def measured(den, rounding):
    params = params_from_dict({"quant": {"weight_bits": 4, "edge_bits": 4, "weight_bits_budget": 6.0},
                               "calibrate": {"method": "minmax", "rounding": rounding}})
    codes = integer_codes(params)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, *den.sample_shape, generator=g), torch.linspace(10, 90, 4)
    before = {k: v.clone() for k, v in den.net.state_dict().items()}
    with torch.no_grad():
        mixed = mixed_precision(params, den, quant_config(params, den, None, codes),
                                lambda net: [den.call(net, x, t)])
    assert all(torch.equal(v, before[k]) for k, v in den.net.state_dict().items())  # the float network is kept
    return mixed


def test_with_gptq_rounding_the_sensitivities_are_those_of_gptq_codes(den):
    near, gptq = measured(den, "nearest"), measured(den, "gptq")
    assert set(near.sensitivity) == set(gptq.sensitivity) and len(near.sensitivity) > 4
    assert near.mean_bits <= 6.0 and gptq.mean_bits <= 6.0
    # GPTQ's codes cost each layer less output error on the batches its Hessian came from: most layers and the
    # total come out less sensitive than nearest rounding's
    lower = [n for n in near.sensitivity if gptq.sensitivity[n] < near.sensitivity[n]]
    assert len(lower) > len(near.sensitivity) / 2, (lower, near.sensitivity, gptq.sensitivity)
    assert sum(gptq.sensitivity.values()) < sum(near.sensitivity.values())
