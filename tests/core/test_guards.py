"""Numerical guards: integer ranges and int32 accumulators checked per layer, non-finite values located."""

import pytest
import torch
import torch.nn as nn

from pqd.core.quantize import apply_qstate, LayerQParams
from pqd.core.guards import INT32_MAX, NumericalError, check_layer_qparams, locate_nonfinite


def qparams(codes, w_scale=None, a_scale=None, a_zp=None, wbits=8, abits=8):
    out = codes.shape[0]
    return dict(weight_int=codes, weight_scale=torch.ones(out) if w_scale is None else w_scale, weight_bits=wbits,
                act_scale=torch.full((2, 1), 0.1) if a_scale is None else a_scale,
                act_zero_point=torch.full((2, 1), 128.0) if a_zp is None else a_zp, act_bits=abits)


def test_usable_parameters_pass():
    check_layer_qparams("ok", **qparams(torch.randint(-8, 8, (4, 3), dtype=torch.int8), wbits=4))


@pytest.mark.parametrize("kw, words", [
    (qparams(torch.tensor([[9, 0]], dtype=torch.int8), wbits=4), "layer L: weight codes in [0, 9] overflow the 4-bit grid: expected [-8, 7]"),
    (qparams(torch.zeros(2, 2, dtype=torch.int8), w_scale=torch.tensor([1.0, 0.0])), "layer L: weight scale 0.0 is not allowed"),
    (qparams(torch.zeros(2, 2, dtype=torch.int8), w_scale=torch.tensor([float("inf"), 1.0])), "weight scale inf"),
    (qparams(torch.zeros(2, 2, dtype=torch.int8), a_scale=torch.tensor([[0.1], [float("nan")]])),
     "layer L, time group 1: activation scale nan is not allowed"),
    (qparams(torch.zeros(2, 2, dtype=torch.int8), a_zp=torch.tensor([[0.0], [300.0]])),
     "layer L, time group 1: activation zero point [300.0] overflows the 8-bit grid: expected values in [0, 255]"),
    (qparams(torch.zeros(2, 2, dtype=torch.float32)), "weight codes are torch.float32"),
    ({**qparams(torch.zeros(2, 2, dtype=torch.int8)), "out_scale": torch.tensor([[0.1], [-1.0]]),
      "out_zero_point": torch.zeros(2, 1)}, "layer L, time group 1: output scale -1.0 is not allowed"),
])
def test_bad_parameters_name_the_layer(kw, words):
    with pytest.raises(NumericalError) as e:
        check_layer_qparams("L", **kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_int32_accumulator_bound():
    # fan-in x max |weight code| x activation code span, against 2**31 - 1 = 2147483647
    assert 60_000 * 127 * 255 == 1_943_100_000 <= INT32_MAX < 70_000 * 127 * 255 == 2_266_950_000
    check_layer_qparams("fits", **qparams(torch.full((1, 60_000), 127, dtype=torch.int8)))
    with pytest.raises(NumericalError, match="layer big: the integer accumulator can reach 2266950000 .fan-in 70000."):
        check_layer_qparams("big", **qparams(torch.full((1, 70_000), 127, dtype=torch.int8)))


def test_apply_qstate_refuses_unusable_parameters_by_layer_name():
    model = nn.Sequential(nn.Linear(3, 2))
    lp = LayerQParams(kind="linear", weight_bits=8, act_bits=8, weight_int=torch.zeros(2, 3, dtype=torch.int8),
                      weight_scale=torch.tensor([1.0, float("nan")]), act_scale=torch.full((1, 1), 0.1),
                      act_zero_point=torch.zeros(1, 1))
    with pytest.raises(NumericalError, match="layer 0: weight scale nan"):
        apply_qstate(model, {"0": lp})


def test_locate_nonfinite_names_the_first_layer_that_overflows():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    assert locate_nonfinite(net, lambda: net(x)) is None
    with torch.no_grad():
        net[2].weight[0, 0] = float("inf")
    net[0].bias.data.fill_(10.0)  # ReLU output > 0, so inf * positive = inf in layer 2
    assert not torch.isfinite(net(x)).all()
    assert locate_nonfinite(net, lambda: net(x)) == "2"
    assert locate_nonfinite(net, lambda: net(torch.full((3, 4), float("nan")))) == "<input of 0>"


def test_sampling_fails_loudly_naming_layer_and_step(tiny_pipeline):
    from pqd.diffusion.adapter import load_denoiser
    from pqd.diffusion.sampling import make_scheduler, sample

    den = load_denoiser(tiny_pipeline)
    with torch.no_grad():
        den.net.mid_block.resnets[0].conv1.bias[0] = float("inf")
    sched = make_scheduler("ddim", den.scheduler_config, den.scheduler_class)
    with pytest.raises(NumericalError) as e:
        sample(den, sched, [0, 1], steps=3, progress=False)
    msg = str(e.value)
    assert "non-finite UNet output at sampling step 0 (timestep " in msg
    assert "first produced by layer mid_block.resnets.0.conv1" in msg


def test_calibration_names_the_layer_whose_input_is_non_finite():
    from pqd.core.quantize import fit_qstate, QuantConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[2].weight[0, 0] = float("inf")
    net[0].bias.data.fill_(10.0)
    xs = [torch.randn(8, 4) for _ in range(2)]

    def forward_all(m, set_group):
        for g, x in enumerate(xs):
            set_group(g)
            m(x)

    with pytest.raises(NumericalError, match=r"layer 3, time group 0: input has non-finite values \(min "):
        fit_qstate(net, forward_all, QuantConfig(time_groups=2))
