import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.core.modules import quant_layers
from pqd.core.quantize import apply_qstate, fit_qstate, QuantConfig
from pqd.core.timegroups import set_time_group
from pqd.core.affine import fake_quantize
from pqd.core.qtypes import act_qtype


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        h = F.silu(self.conv(x)).mean(dim=(2, 3))
        return self.lin(h)


def data(n=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def fit(model, bits=8, **kw):
    batches = data()
    return fit_qstate(model, lambda m, set_group: [m(b) for b in batches], QuantConfig(weight_bits=bits, **kw))


def test_fit_covers_every_conv_and_linear():
    torch.manual_seed(0)
    m = Tiny()
    state = fit(m)
    assert set(state) == {"conv", "lin"}
    assert state["conv"].weight_int.dtype == torch.int8 and state["conv"].weight_scale.shape == (8,)
    assert state["lin"].act_scale.shape == (1, 1)


def test_quantized_linear_matches_manual_integer_computation():
    torch.manual_seed(0)
    m = Tiny()
    state = fit(m, act_range="minmax")
    q = apply_qstate(copy.deepcopy(m), state)
    x = torch.randn(5, 8)
    lp = state["lin"]
    xq = fake_quantize(x, lp.act_scale[0, 0], lp.act_zero_point[0, 0], act_qtype(8))
    w = lp.weight_int.float() * lp.weight_scale[:, None]
    expected = xq @ w.T + m.lin.bias
    assert torch.allclose(q.lin(x), expected, atol=1e-6)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.25)])
def test_quantized_model_close_to_float(bits, tol):
    torch.manual_seed(0)
    m = Tiny()
    q = apply_qstate(copy.deepcopy(m), fit(m, bits))
    x = data(1)[0]
    ref = m(x)
    rel = (q(x) - ref).norm() / ref.norm()
    assert rel < tol
    assert len(quant_layers(q)) == 2


def test_layer_bits_override():
    torch.manual_seed(0)
    m = Tiny()
    state = fit(m, 4, layer_weight_bits={"conv": 8})
    assert state["conv"].weight_bits == 8 and state["lin"].weight_bits == 4
    assert int(state["lin"].weight_int.max()) <= 7 and int(state["lin"].weight_int.min()) >= -8


def test_unused_layer_is_an_error():
    m = Tiny()
    with pytest.raises(RuntimeError, match="received no input"):
        fit_qstate(m, lambda mod, set_group: mod.conv(data(1)[0]), QuantConfig())


def test_set_time_group_range_checked():
    torch.manual_seed(0)
    m = apply_qstate(Tiny(), fit(Tiny()))
    set_time_group(m, 0)
    with pytest.raises(ValueError, match="time group 1"):
        set_time_group(m, 1)
