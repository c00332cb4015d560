"""Glue sites (quant.glue): where the adapter puts them in a diffusers UNet, and that in float they change nothing.

Each site must carry exactly the tensor that diffusers' own forward pass computes at that point; the reference is
an untouched copy of the model, observed with hooks on diffusers' modules."""

import copy
import pickle

import pytest
import torch

from pqd.core.modules import Site, sites
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.glue import GLUE_KINDS, glue_sites, install_sites


@pytest.fixture(scope="module")
def den(tiny_pipeline):
    return load_denoiser(tiny_pipeline)


def run(model, n=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(n, 1, 8, 8, generator=g), torch.tensor([90.0, 40.0, 5.0][:n])).sample


def test_site_names_per_kind(den):
    splits = den.skip_splits()
    resnets = [n for n, m in den.net.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    attentions = [n for n, m in den.net.named_modules() if type(m).__name__ == "Attention"]
    concat_blocks = sorted({n.rpartition(".")[0] for n in splits})
    names = lambda kinds, split=False: glue_sites(den.net, kinds, splits, split)  # noqa: E731
    assert names(["residual"]) == [f"{r}.glue_residual" for r in resnets]
    assert names(["temb"]) == [f"{r}.glue_temb" for r in resnets]
    assert names(["attention"]) == [f"{a}.glue_residual" for a in attentions]
    assert names(["concat"]) == [f"{b}.glue_concat" for b in concat_blocks] and concat_blocks
    assert len(names(["silu"])) == 4 * len(resnets)
    # with split inputs the split layers quantize the concatenation's parts: no concat, no SiLU feeding conv1 there
    split_silu = names(["silu", "concat"], split=True)
    assert not any(n.endswith("glue_concat") for n in split_silu)
    assert len(split_silu) == 4 * len(resnets) - 2 * len(concat_blocks)
    with pytest.raises(ValueError, match="glue kind 'gelu' is not allowed"):
        names(["gelu"])


def test_float_sites_carry_what_diffusers_computes(den):
    """Every site sees the tensor diffusers' forward pass has there, and the output does not change."""
    ref = copy.deepcopy(den.net)
    want: dict[str, torch.Tensor] = {}

    def keep(key):
        return lambda m, a, y: want.__setitem__(key, y.detach().clone())

    hooks = []
    for n, m in ref.named_modules():
        if type(m).__name__ == "ResnetBlock2D":
            hooks += [m.register_forward_hook(keep(f"{n}.glue_residual")),
                      m.norm1.register_forward_hook(keep(f"{n}.glue_silu1_in")),
                      m.norm2.register_forward_hook(keep(f"{n}.glue_silu2_in")),
                      m.register_forward_pre_hook(lambda mod, a, key=f"{n}.glue_concat": want.__setitem__(key, a[0].clone())),
                      m.norm2.register_forward_pre_hook(lambda mod, a, key=f"{n}.glue_temb": want.__setitem__(key, a[0].clone()))]
        if type(m).__name__ == "Attention":
            hooks.append(m.register_forward_hook(keep(f"{n}.glue_residual")))
    y_ref = run(ref)
    for h in hooks:
        h.remove()
    model = copy.deepcopy(den.net)
    names = install_sites(model, glue_sites(model, GLUE_KINDS, den.skip_splits(), split=False))
    seen: dict[str, torch.Tensor] = {}
    for n, m in sites(model).items():
        m.register_forward_hook(lambda mod, a, y, key=n: seen.__setitem__(key, y.detach().clone()))
    y = run(model)
    assert set(seen) == set(names)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=0)
    for n, t in seen.items():
        if n.endswith("_sig"):  # sigmoid of the site before it
            assert torch.allclose(t, torch.sigmoid(seen[n.replace("_sig", "_in")]), atol=1e-6)
        else:
            assert torch.allclose(t, want[n], atol=1e-5, rtol=0), n


def test_install_is_idempotent_and_copies_route_through_their_own_sites(den):
    model = copy.deepcopy(den.net)
    names = glue_sites(model, ["residual"], den.skip_splits(), split=False)
    install_sites(model, names)
    install_sites(model, names)
    assert sorted(sites(model)) == sorted(names)
    twin = copy.deepcopy(model)
    calls = []
    for n in names:
        twin.get_submodule(n).register_forward_hook(lambda *a: calls.append(1))
    run(model)
    assert not calls  # the original does not call the copy's sites
    run(twin)
    assert len(calls) == len(names)
    with pytest.raises(ValueError, match="not allowed"):
        install_sites(model, ["conv_in.glue_residual"])
    assert isinstance(model.get_submodule(names[0]), Site)


def test_a_network_with_sites_survives_pickling_and_routes_through_its_own_sites(den):
    """What a Dask worker receives (parallel reconstruction): the pickled network keeps its glue forward passes."""
    model = copy.deepcopy(den.net)
    names = install_sites(model, glue_sites(model, GLUE_KINDS, den.skip_splits(), split=False))
    twin = pickle.loads(pickle.dumps(model))
    calls = []
    for n in names:
        twin.get_submodule(n).register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(run(twin), run(model))
    assert len(calls) == len(names)
