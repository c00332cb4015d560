"""Channel balancing (quant.smooth): SmoothQuant's factors from per-time-group channel maxima, folded into the
weights, the balanced layer's product unchanged in float and better quantized, and reconstruction learning the
rounding of the folded weight."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from pqd.core.modules import QuantLinear
from pqd.core.quantize import QuantConfig, apply_qstate, fit_qstate, qstate_of
from pqd.core.reconstruct import ReconConfig, reconstruct_model
from pqd.core.smooth import smoothing_factors


def outlier_batches(seed: int = 0) -> list[torch.Tensor]:
    """Two time groups of token activations [B, L, 32]; channels 0-2 are outliers, far larger in group 1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for group, scale in ((0, 10.0), (1, 60.0)):
        x = torch.randn(16, 6, 32, generator=g)
        x[..., :3] *= scale
        out.append(x)
    return out


def fit(model: nn.Module, batches: list[torch.Tensor], smooth: frozenset[str], **kw) -> dict:
    def forward_all(m, set_group):
        for group, x in enumerate(batches):
            set_group(group)
            m(x)

    return fit_qstate(model, forward_all, QuantConfig(time_groups=len(batches), smooth=smooth, **kw))


def test_factors_follow_smoothquant_rule_with_the_largest_group():
    g = torch.Generator().manual_seed(1)
    act = torch.rand(3, 8, generator=g) * 5  # [G, C]
    w = torch.randn(4, 8, generator=g)
    s = smoothing_factors(act, w, 0.5)
    a = act.numpy().max(axis=0)
    ref = np.sqrt(a) / np.sqrt(np.abs(w.numpy()).max(axis=0))
    assert np.allclose(s.numpy(), ref, rtol=1e-6)
    assert np.allclose(smoothing_factors(act, w, 0.8).numpy(), a ** 0.8 / np.abs(w.numpy()).max(axis=0) ** 0.2, rtol=1e-5)


def test_balanced_layer_keeps_its_product_and_quantizes_better():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    batches = outlier_batches()
    plain = fit(model, batches, frozenset(), act_range="minmax")
    balanced = fit(model, batches, frozenset({"0"}), act_range="minmax")
    s = balanced["0"].smooth
    # one factor per input channel, from the maxima over both groups: the outlier channels get the largest
    assert s.shape == (32,) and bool((s[:3] > s[3:].max()).all())
    maxima = torch.stack([x.abs().reshape(-1, 32).amax(0) for x in batches])
    assert torch.allclose(s, smoothing_factors(maxima, model[0].weight, 0.5))
    # in float, (x / s) (W s)ᵀ = x Wᵀ
    x = batches[1]
    assert torch.allclose((x / s) @ (model[0].weight * s).T, x @ model[0].weight.T, rtol=1e-4, atol=1e-4)
    # the activation grid of each group shrinks, and the quantized layer lands closer to the float one
    assert bool((balanced["0"].act_scale < plain["0"].act_scale).all())
    errs = {}
    for name, state in (("plain", plain), ("balanced", balanced)):
        q = apply_qstate(copy.deepcopy(model), state)
        err = 0.0
        for group, xb in enumerate(batches):
            q[0].act.group = group
            with torch.no_grad():
                err += float((q(xb) - model(xb)).pow(2).mean())
        errs[name] = err
    assert errs["balanced"] < 0.5 * errs["plain"]
    back = qstate_of(apply_qstate(copy.deepcopy(model), balanced))
    assert torch.equal(back["0"].smooth, s)


def test_reconstruction_learns_the_rounding_of_the_folded_weight():
    """AdaRound starts from the float weight the codes stand for (weight x s): its codes stay within one step of
    nearest rounding of that weight (from the unbalanced weight they would be far off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    batches = outlier_batches()
    state = fit(model, batches, frozenset({"0"}), weight_bits=4, act_range="minmax")
    q = apply_qstate(copy.deepcopy(model), state)
    layer = q[0]
    assert isinstance(layer, QuantLinear) and layer.smooth is not None
    nearest = torch.round(model[0].weight * state["0"].smooth[None] / state["0"].weight_scale[:, None]).clamp(-8, 7)
    reconstruct_model(model, q, ["0"], lambda m, i: m(batches[i]), [0, 1],
                      ReconConfig(iters=20, batch_size=8, qdrop_p=0.0, lsq=False), progress=False)
    assert int((layer.weight_int.float() - nearest).abs().max()) <= 1
