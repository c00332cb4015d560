"""Quantized attention matmuls (quant.attention): Q·Kᵀ and softmax·V as modules with their own operand quantizers.

The float MatMulAttention processor must compute what diffusers' default attention computes, on the
self-attention of a pixel UNet and the cross-attention of a text UNet; the quantized matmul must compute
exactly fake-quantized operands multiplied, per time group, with the softmax output on its own (wider) grid.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pqd.core.quantize import apply_qstate, fit_qstate, qstate_of, QuantConfig
from pqd.core.timegroups import set_time_group
from pqd.core.affine import fake_quantize
from pqd.core.modules import MatMul, QuantMatMul
from pqd.core.qtypes import act_qtype
from pqd.core.quantize import MatMulQParams
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.attention import use_matmul_attention
from support.models import build_pixel_cifar, build_text_sd


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 24)
        self.qk, self.pv = MatMul(), MatMul()

    def forward(self, x):
        q, k, v = self.proj(x).chunk(3, dim=-1)
        return self.pv(self.qk(q, k.transpose(-1, -2)).softmax(-1), v)


def test_matmul_operands_get_their_own_grids_per_time_group():
    torch.manual_seed(0)
    m = TinyAttention()
    batches = [torch.randn(4, 6, 8) * (1 + 3 * g) for g in range(2)]  # group 1 has a wider range

    def forward_all(model, set_group):
        for g, b in enumerate(batches):
            set_group(g)
            model(b)

    state = fit_qstate(m, forward_all, QuantConfig(time_groups=2, act_range="minmax", operand_bits={"pv": (16, 8)}))
    qk, pv = state["qk"], state["pv"]
    assert isinstance(qk, MatMulQParams) and (qk.a_bits, qk.b_bits) == (8, 8) and (pv.a_bits, pv.b_bits) == (16, 8)
    assert qk.a_scale.shape == (2, 1) and bool(qk.a_scale[1, 0] > qk.a_scale[0, 0])
    assert float(pv.a_scale.max()) <= 1 / 65535 + 1e-9  # softmax output in [0, 1] on a 16-bit grid
    q = apply_qstate(copy.deepcopy(m), state)
    assert isinstance(q.qk, QuantMatMul) and isinstance(q.pv, QuantMatMul)
    a, b = torch.randn(4, 6, 6), torch.randn(4, 6, 8)
    for g in range(2):
        set_time_group(q, g)
        expected = fake_quantize(a, pv.a_scale[g, 0], pv.a_zero_point[g, 0], act_qtype(16)) @ \
            fake_quantize(b, pv.b_scale[g, 0], pv.b_zero_point[g, 0], act_qtype(8))
        assert torch.equal(q.pv(a, b), expected)
    back = qstate_of(q)
    assert torch.equal(back["pv"].a_scale, pv.a_scale) and back["pv"].a_bits == 16


@pytest.mark.parametrize("build", [build_pixel_cifar, build_text_sd], ids=["self-attention", "cross-attention"])
def test_matmul_attention_computes_what_diffusers_computes(tmp_path: Path, build):
    den = load_denoiser(build(tmp_path / "pipe"))
    x = torch.randn(3, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([90, 40, 3])
    cond = den.conditioning(["a photo of a cat", "a small blue bird"], [1, 2, 0], 1.0).per_seed() if den.conditional else None
    with torch.no_grad():
        ref = den.call(den.net, x, t, cond)
        roles = use_matmul_attention(den.net)
        got = den.call(den.net, x, t, cond)
    assert roles and set(roles.values()) == {"qk", "pv"}
    if den.conditional:
        assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.qk" in roles  # cross-attention
    assert use_matmul_attention(den.net) == roles  # idempotent
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_reconstruction_learns_8_bit_steps_but_leaves_a_16_bit_softmax_grid_alone():
    """LSQ (Adam on step sizes, lr ~1e-3) would turn a 16-bit step of ~1.5e-5 into one coarser than 8 bits."""
    from pqd.core.reconstruct import ReconConfig, UnitBatch, reconstruct_unit

    torch.manual_seed(0)
    fp = TinyAttention()
    xs = [torch.randn(8, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    state = fit_qstate(fp, lambda m, set_group: [m(x) for x in xs], QuantConfig(operand_bits={"pv": (16, 8)}))
    q = apply_qstate(copy.deepcopy(fp), state)
    with torch.no_grad():
        batches = [UnitBatch((x,), {}, fp(x)) for x in xs]
    before_pv, before_qk = q.pv.qa.scale.detach().clone(), q.qk.qa.scale.detach().clone()
    reconstruct_unit(q, {"proj": fp.proj.weight.detach()}, batches,
                     ReconConfig(iters=30, batch_size=4, qdrop_p=0.0, adaround=False, lsq=True),
                     torch.Generator().manual_seed(0))
    assert torch.equal(q.pv.qa.scale, before_pv)  # the 16-bit softmax grid is never learned
    assert not q.pv.qa.scale.requires_grad and not q.qk.qa.scale.requires_grad
    # 8-bit step sizes were learned, unless the guard put them back because learning did not help
    assert not torch.equal(q.qk.qa.scale, before_qk) or torch.equal(q.proj.act.scale, state["proj"].act_scale)
