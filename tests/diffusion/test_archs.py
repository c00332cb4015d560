"""The transformer architectures: their layer roles, their conditioning inputs, their attention with replaceable
matmuls, and the reference architecture configs (built on the meta device, checked against published counts)."""

from __future__ import annotations

import copy
import dataclasses

import diffusers
import pytest
import torch

from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.diffusion.archs import DiTArch, architecture_of
from pqd.diffusion.attention import use_matmul_attention
from pqd.diffusion.configs import DIT_XL_2_256, PIXART_XL_2_512, SD3_MEDIUM
from pqd.diffusion.demo import build_demo_dit
from pqd.diffusion.encoders import ClassLabels
from support.models import PROMPTS, build_text_pixart, build_text_sd3


def layer_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return load_denoiser(build_text_pixart(tmp_path_factory.mktemp("pixart") / "pipe"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return load_denoiser(build_text_sd3(tmp_path_factory.mktemp("sd3") / "pipe"))


def test_reference_configs_have_the_published_parameter_counts():
    """facebookresearch/DiT's DiT-XL/2 has 675,129,632 parameters (its fixed position embedding counted as one);
    diffusers' conversion copies the shared timestep and class embedders into each of the 28 blocks, and keeps the
    position embedding as a buffer. PixArt-XL-2's transformer has 610,856,096 and SD3 medium's 2,028,328,000."""
    with torch.device("meta"):
        dit = diffusers.Transformer2DModel.from_config(DIT_XL_2_256)
        pixart = diffusers.Transformer2DModel.from_config(PIXART_XL_2_512)
        sd3 = diffusers.SD3Transformer2DModel.from_config(SD3_MEDIUM)
    assert (type(dit).__name__, type(pixart).__name__) == ("DiTTransformer2DModel", "PixArtTransformer2DModel")
    copies = sum(p.numel() for n, p in dit.named_parameters()
                 if ".norm1.emb." in n and not n.startswith("transformer_blocks.0."))
    assert sum(p.numel() for p in dit.parameters()) - copies + dit.pos_embed.pos_embed.numel() == 675_129_632
    assert sum(p.numel() for p in pixart.parameters()) == 610_856_096
    assert sum(p.numel() for p in sd3.parameters()) == 2_028_328_000
    assert dit.config.sample_size // dit.config.patch_size == 16 and pixart.use_additional_conditions is False


def test_dit_layer_roles():
    model = build_demo_dit(width=64, depth=2)
    arch, names = architecture_of(model), layer_names(model)
    assert arch.name == "dit"
    assert set(arch.edge_layers(names)) == {"pos_embed.proj", "proj_out_2"} | {
        f"transformer_blocks.{b}.norm1.emb.timestep_embedder.linear_{i}" for b in (0, 1) for i in (1, 2)}
    assert set(arch.modulation_layers(names)) == {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear",
                                                  "proj_out_1"}
    assert set(arch.float_output_layers(names)) == {"proj_out_2"} | set(arch.modulation_layers(names))
    units = arch.units(model, names)
    assert units[:2] == ["transformer_blocks.0", "transformer_blocks.1"]  # the blocks are the reconstruction units
    assert set(units[2:]) == {"pos_embed.proj", "proj_out_1", "proj_out_2"}
    assert set(arch.smooth_layers(model, names)) == {f"transformer_blocks.{b}.{n}" for b in (0, 1) for n in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")}


def test_pixart_and_sd3_layer_roles(pixart, sd3):
    names = layer_names(pixart.net)
    assert set(pixart.modulation_layers(names)) == {"adaln_single.linear"}
    assert {"caption_projection.linear_1", "pos_embed.proj", "proj_out"} <= set(pixart.edge_layers(names))
    assert "transformer_blocks.1.attn2.to_k" in pixart.smooth_layers(names)  # cross-attention on the text
    names = layer_names(sd3.net)
    assert set(sd3.modulation_layers(names)) == {"norm_out.linear"} | {
        f"transformer_blocks.{b}.{n}.linear" for b in (0, 1) for n in ("norm1", "norm1_context")}
    assert {"context_embedder", "time_text_embed.text_embedder.linear_1", "proj_out"} <= set(sd3.edge_layers(names))
    assert sd3.units(names)[:2] == ["transformer_blocks.0", "transformer_blocks.1"]
    # the last block is context-pre-only: its context tokens get no output projection and no feed-forward
    assert "transformer_blocks.0.attn.to_add_out" in names and "transformer_blocks.1.attn.to_add_out" not in names


def test_conditioning_rows_are_the_pipelines_own_encodings(pixart, sd3):
    """Row 0 is the empty prompt, row 1 + i prompt i, as diffusers' encode_prompt computes them."""
    rows = pixart.conditioning(PROMPTS, [1, 2], 4.5).inputs
    emb, mask, _, _ = pixart.encoder.pipe.encode_prompt(PROMPTS[1], do_classifier_free_guidance=False)
    assert torch.allclose(rows["encoder_hidden_states"][2], emb[0], atol=1e-6)
    assert torch.equal(rows["encoder_attention_mask"][2], mask[0].to(torch.int64))
    assert int(rows["encoder_attention_mask"][0].sum()) < int(rows["encoder_attention_mask"][2].sum())  # "" is shorter
    rows = sd3.conditioning(PROMPTS, [1], 7.0).inputs
    emb, _, pooled, _ = sd3.encoder.pipe.encode_prompt(PROMPTS[2], None, None, do_classifier_free_guidance=False)
    assert torch.allclose(rows["encoder_hidden_states"][3], emb[0], atol=1e-6)
    assert torch.allclose(rows["pooled_projections"][3], pooled[0], atol=1e-6)
    labels = ClassLabels(build_demo_dit(width=32, depth=1).config.num_embeds_ada_norm).rows()["class_labels"]
    assert labels.tolist() == [10, *range(10)]  # the null class first, then every class


@pytest.mark.parametrize("which", ["pixart", "sd3", "dit"])
def test_matmul_attention_computes_what_diffusers_computes(which, pixart, sd3):
    """Self-, cross- (PixArt, with the text's attention mask) and joint attention (SD3) with replaceable matmuls
    compute what diffusers' scaled-dot-product processors compute, CFG batch included."""
    if which == "dit":
        torch.manual_seed(0)
        den = Denoiser(build_demo_dit(width=64, depth=2).eval(), {}, "DDPMScheduler", (1, 8, 8),
                       encoder=ClassLabels(10), arch=DiTArch())
    else:
        fp = {"pixart": pixart, "sd3": sd3}[which]
        den = dataclasses.replace(fp, net=copy.deepcopy(fp.net))  # the module fixture's network stays as it is
    x = torch.randn(3, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([90.0, 40.0, 3.0])
    rows = den.conditioning(None if which == "dit" else PROMPTS, [1, 2, 3], 2.0)
    with torch.no_grad():
        ref = den.guided(x, t, rows.per_seed(), rows.unconditional(), 2.0)
        roles = use_matmul_attention(den.net)
        got = den.guided(x, t, rows.per_seed(), rows.unconditional(), 2.0)
    assert roles and set(roles.values()) == {"qk", "pv"}
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_flow_matching_models_sample_with_their_own_scheduler():
    from pqd.diffusion.sampling import make_scheduler
    from pqd.errors import ParamError

    with pytest.raises(ParamError, match="generate.scheduler = 'ddim' is not allowed for this flow-matching model "
                                         r"\(FlowMatchEulerDiscreteScheduler\): expected 'keep'"):
        make_scheduler("ddim", {"num_train_timesteps": 1000, "shift": 3.0}, "FlowMatchEulerDiscreteScheduler")
    sched = make_scheduler("keep", {"num_train_timesteps": 1000, "shift": 3.0}, "FlowMatchEulerDiscreteScheduler")
    sched.set_timesteps(4)
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler" and float(sched.timesteps[0]) == 1000.0
