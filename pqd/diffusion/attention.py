"""Attention with replaceable matmuls: how the product quantizes Q·Kᵀ and softmax·V of diffusers models.

diffusers computes attention in one fused kernel (scaled dot product), which leaves nothing to observe or quantize
between the projections; these processors compute the same with two :class:`pqd.core.modules.MatMul` modules.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pqd.core.modules import MatMul


class MatMulAttention(nn.Module):
    """diffusers' default attention processor (same projections, norms, residual and rescaling) with ``qk`` (Q·Kᵀ,
    scaled by 1/sqrt(head dim) after the product) and ``pv`` (softmax·V) as modules, the softmax in float."""

    def __init__(self) -> None:
        super().__init__()
        self.qk, self.pv = MatMul(), MatMul()

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.reshape(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        batch, heads = hidden_states.shape[0], attn.heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, heads * d] -> [B, heads, L, d]
            return x.reshape(batch, x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)

        q, k, v = split_heads(attn.to_q(hidden_states)), split_heads(attn.to_k(context)), split_heads(attn.to_v(context))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        scores = self.qk(q, k.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            scores = scores + mask.reshape(batch, heads, -1, mask.shape[-1])
        out = self.pv(scores.softmax(dim=-1), v)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3])))
        if image:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class MatMulJointAttention(nn.Module):
    """SD3's joint attention (diffusers' ``JointAttnProcessor2_0``: the image tokens and the context tokens,
    each with their own projections, attend over their concatenation) with the same two replaceable matmuls as
    :class:`MatMulAttention`."""

    def __init__(self) -> None:
        super().__init__()
        self.qk, self.pv = MatMul(), MatMul()

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        batch, heads, n = hidden_states.shape[0], attn.heads, hidden_states.shape[1]

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, heads * d] -> [B, heads, L, d]
            return x.reshape(batch, x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)

        q, k, v = (split_heads(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq, ck, cv = (split_heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if getattr(attn, "norm_added_q", None) is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = self.pv((self.qk(q, k.transpose(-1, -2)) * attn.scale).softmax(dim=-1), v)
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1])
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if context is None else (out, context)


def attention_modules(net: nn.Module) -> list[str]:
    """The names of ``net``'s diffusers ``Attention`` modules (what quant.attention acts on)."""
    from diffusers.models.attention_processor import Attention

    return [name for name, m in net.named_modules() if isinstance(m, Attention)]


def use_matmul_attention(net: nn.Module) -> dict[str, str]:
    """Give every diffusers ``Attention`` module of ``net`` a processor with replaceable matmuls (idempotent):
    :class:`MatMulJointAttention` where diffusers uses its joint (SD3) processor, :class:`MatMulAttention`
    elsewhere; returns the names of the matmul modules with their role: ``"qk"`` (Q·Kᵀ) or ``"pv"`` (softmax·V)."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    roles: dict[str, str] = {}
    for name, m in net.named_modules():
        if isinstance(m, Attention):
            if isinstance(m.processor, JointAttnProcessor2_0):
                m.set_processor(MatMulJointAttention())
            elif not isinstance(m.processor, (MatMulAttention, MatMulJointAttention)):
                if getattr(m, "added_kv_proj_dim", None) is not None or getattr(m, "only_cross_attention", False):
                    raise ValueError(f"attention module {name}: added key/value projections are not supported for "
                                     "attention matmul quantization: expected quant.attention = false")
                m.set_processor(MatMulAttention())
            roles |= {f"{name}.processor.qk": "qk", f"{name}.processor.pv": "pv"}
    return roles
