"""Mixed precision under a budget (pqd.core.mixed): sensitivities measured on the network, and the solver."""

import pytest
import torch
import torch.nn as nn

from pqd.core.affine import weight_values
from pqd.core.mixed import choose_high, layer_cost, mean_bits, weight_sensitivity
from pqd.core.quantize import quantize_weight


def test_the_solver_keeps_the_most_sensitive_layers_per_extra_bit_within_the_budget():
    costs = {"a": layer_cost((100, 10), 100, 100, 4, 8),  # 1000 weights each
             "b": layer_cost((100, 10), 100, 100, 4, 8),
             "c": layer_cost((100, 10), 100, 100, 4, 8),
             "edge": layer_cost((10, 10), 10, 10, 8, 8)}  # fixed at 8 bits
    floor = mean_bits(costs, set())
    assert floor == pytest.approx((3 * (4000 + 3200) + 800 + 320) / 3100)
    one_more = (costs["a"].high_bits - costs["a"].low_bits) / 3100
    sens = {"a": 0.1, "b": 0.5, "c": 0.3}
    assert choose_high(costs, sens, floor) == set()
    assert choose_high(costs, sens, floor + one_more) == {"b"}
    assert choose_high(costs, sens, floor + 2 * one_more + 1e-9) == {"b", "c"}
    assert choose_high(costs, sens, 100.0) == {"a", "b", "c"}
    with pytest.raises(ValueError, match=r"quant.weight_bits_budget = 3 is not allowed for this model: expected at least"):
        choose_high(costs, sens, 3.0)


def test_sensitivity_finds_the_layer_whose_low_bits_hurt_the_output_and_restores_every_weight():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with torch.no_grad():  # layer 0's weights already lie on its 2-bit grid {-c, 0, c}: rounding them costs nothing
        net[0].weight.copy_(0.2 * torch.randint(-1, 2, (16, 16)).float())
        net[0].weight[:, 0] = 0.2
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(64, 16)

    def low(name):
        return weight_values(*quantize_weight(net.get_submodule(name).weight, 2, "minmax"))

    sens = weight_sensitivity(net, lambda m: [m(x)], ["0", "2"], low)
    assert set(sens) == {"0", "2"} and sens["0"] < 1e-12 < 1e-3 < sens["2"]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert weight_sensitivity(net, lambda m: [m(x)], ["0"], lambda n: net.get_submodule(n).weight.detach()) == {"0": 0.0}
