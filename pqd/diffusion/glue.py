"""Glue between integer kernels (quant.glue): the points where a diffusers UNet's activations pass between integer
kernels through float operations, as :class:`pqd.core.modules.Site` modules on grids fitted per time group, so
onnxruntime runs integer kernels there too (the kinds and their kernels: docs/parameters.md, ``quant.glue``).

``silu`` computes each SiLU after a GroupNorm as x·sigmoid(x) with x and sigmoid(x) on grids (the product is the
next convolution's input, already on its grid). A point is left out where no integer kernel could take it: a SiLU
or a concatenation that feeds a split input (calibrate.split_shortcut), which quantizes its two parts itself.
Sites are named ``<block>.glue_<role>``; ResNet blocks with sites compute their forward pass here
(:func:`_resnet_forward`, diffusers' arithmetic for the configurations it accepts), attention blocks pass their
output through a forward hook.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from pqd.core.modules import Site
from pqd.params.sections import GLUE_KINDS
_RESNET_ROLES = {"residual": ("residual",), "temb": ("temb",), "concat": ("concat",),
                 "silu": ("silu1_in", "silu1_sig", "silu2_in", "silu2_sig")}
_PREFIX = "glue_"


def _is_resnet(m: nn.Module) -> bool:
    """A diffusers ResNet block whose forward pass :func:`_resnet_forward` reproduces."""
    return (type(m).__name__ == "ResnetBlock2D" and m.upsample is None and m.downsample is None
            and m.time_embedding_norm == "default")


def _is_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "Attention" and bool(getattr(m, "residual_connection", False))


def glue_sites(model: nn.Module, kinds: tuple[str, ...] | list[str], concat_inputs: dict[str, int],
               split: bool) -> list[str]:
    """The site names for glue ``kinds`` in ``model``. ``concat_inputs``: the layers whose input is a skip
    concatenation (pqd.diffusion.archs: ``skip_splits``), ``split``: whether those inputs are split."""
    unknown = sorted(set(kinds) - set(GLUE_KINDS))
    if unknown:
        raise ValueError(f"glue kind {unknown[0]!r} is not allowed: expected one of {', '.join(GLUE_KINDS)}")
    concat_blocks = {n.rpartition(".")[0] for n in concat_inputs}
    names = []
    for owner, m in model.named_modules():
        if _is_resnet(m):
            roles = [r for k in kinds if k in _RESNET_ROLES for r in _RESNET_ROLES[k]]
            if owner not in concat_blocks:
                roles = [r for r in roles if r != "concat"]
            elif split:  # the split conv1 and conv_shortcut quantize the concatenation's parts themselves
                roles = [r for r in roles if r not in ("concat", "silu1_in", "silu1_sig")]
            names += [f"{owner}.{_PREFIX}{r}" for r in roles]
        elif _is_attention(m) and "attention" in kinds:
            names.append(f"{owner}.{_PREFIX}residual")
    return names


def resampling_convs(model: nn.Module) -> dict[str, str]:
    """The convolutions of diffusers' down- and upsamplers that read their block's input through an operation that
    keeps every value on its grid, by name, with the block's name: zero padding (Downsample2D with padding 0 pads
    right and bottom by hand) or nearest-neighbour upsampling (Upsample2D)."""
    out, named = {}, {id(m): n for n, m in model.named_modules()}  # a module held under two names is listed under one
    for name, m in model.named_modules():
        kind = type(m).__name__
        conv = getattr(m, "conv", None)
        if not isinstance(conv, nn.Conv2d) or getattr(m, "norm", None) is not None or not getattr(m, "use_conv", False):
            continue
        if kind == "Downsample2D" or (kind == "Upsample2D" and not m.use_conv_transpose and m.interpolate):
            out[named[id(conv)]] = name
    return out


def install_sites(model: nn.Module, names: list[str]) -> list[str]:
    """Give ``model`` the float sites ``names`` (see :func:`glue_sites`; the names a calibrated state holds),
    with the forward passes that route activations through them. Idempotent; returns ``names``."""
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if not attr.startswith(_PREFIX) or not (_is_resnet(owner) or _is_attention(owner)):
            raise ValueError(f"glue site {name!r} is not allowed: expected <resnet or attention block>.glue_<role>")
        if not hasattr(owner, attr):
            owner.add_module(attr, Site())
        if _is_resnet(owner):
            # a partial of a module-level function, not a bound method: a pickled network (a reconstruction unit
            # sent to a Dask worker) keeps it, where a bound method would be looked up by name on the block
            owner.forward = functools.partial(_resnet_forward, owner)
        elif not getattr(owner, "_pqd_glue_hook", False):
            owner.register_forward_hook(_attention_output)
            owner._pqd_glue_hook = True
    return list(names)


def _site(block: nn.Module, role: str, x: torch.Tensor) -> torch.Tensor:
    site = getattr(block, _PREFIX + role, None)
    return x if site is None else site(x)


def _silu(block: nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
    """The block's SiLU; x·sigmoid(x) with both factors through their sites when it has them."""
    if getattr(block, f"{_PREFIX}silu{i}_in", None) is None:
        return block.nonlinearity(x)
    x = _site(block, f"silu{i}_in", x)
    return x * _site(block, f"silu{i}_sig", torch.sigmoid(x))


def _resnet_forward(self: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any,
                    **kwargs: Any) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward (time_embedding_norm 'default', no resampling inside the block) with
    the block's glue sites on its activations."""
    input_tensor = _site(self, "concat", input_tensor)
    hidden_states = _silu(self, self.norm1(input_tensor), 1)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        hidden_states = _site(self, "temb", hidden_states + temb)
    hidden_states = _silu(self, self.norm2(hidden_states), 2)
    hidden_states = self.conv2(self.dropout(hidden_states))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return _site(self, "residual", (input_tensor + hidden_states) / self.output_scale_factor)


def _attention_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.glue_residual(output)
