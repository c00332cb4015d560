"""Deployed graphs of conditioned denoisers: they take every input the denoiser takes (class labels, text
encodings and masks, pooled projections), run in onnxruntime, and compute what the torch model computes."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from pqd import deploy
from pqd.core.modules import quantizable_layers, set_time_group
from pqd.core.quantize import QuantConfig, apply_qstate, fit_qstate
from pqd.core.timegroups import TimeGroups
from pqd.diffusion.adapter import Denoiser, load_denoiser
from pqd.diffusion.archs import DiTArch
from pqd.diffusion.attention import use_matmul_attention
from pqd.diffusion.demo import build_demo_dit
from pqd.diffusion.encoders import ClassLabels
from support.models import PROMPTS, build_text_pixart, build_text_sd3
from support.projects import CODE_BITS_8

# three transformer exports (DiT, PixArt, SD3), about 15 s: make test-fast leaves them out (the stage tests export
# and run the UNet graphs there; tests/e2e/test_architectures.py runs every architecture deployed)
pytestmark = pytest.mark.slow

GROUPS = TimeGroups((500.0,))


def graph_inputs(path) -> list[str]:
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def ort_session(model_bytes: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, deploy.session_options(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def quantized_dit(tmp_path_factory):
    """A random tiny DiT, W8A8 with two time groups, balanced linears and quantized attention matmuls."""
    torch.manual_seed(0)
    den = Denoiser(build_demo_dit(width=64, depth=2).eval(), {"num_train_timesteps": 1000}, "DDPMScheduler",
                   (1, 8, 8), encoder=ClassLabels(10), arch=DiTArch())
    qnet = copy.deepcopy(den.net)
    roles = use_matmul_attention(qnet)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 8, 8, generator=g) * s, torch.full((8,), t), torch.arange(8) % 11)
               for s, t in ((2.0, 800.0), (0.5, 100.0))]

    def forward_all(m, set_group):
        for group, (x, t, y) in enumerate(batches):
            set_group(group)
            den.call(m, x, t, {"class_labels": y})

    names = list(quantizable_layers(qnet))
    float_out = set(den.float_output_layers(names))
    cfg = QuantConfig(weight_bits=CODE_BITS_8, time_groups=2,
                      output_layers=frozenset(n for n in names if n not in float_out),
                      smooth=frozenset(den.smooth_layers(names)), operand_bits={n: (8, 8) for n in roles})
    apply_qstate(qnet, fit_qstate(qnet, forward_all, cfg))
    folder = tmp_path_factory.mktemp("dit-onnx")
    deploy.write_onnx(qnet, GROUPS, den, folder)
    return den, qnet, folder


def test_dit_graph_takes_class_labels_and_matches_the_simulation(quantized_dit):
    den, qnet, folder = quantized_dit
    assert graph_inputs(folder / deploy.graph_file(0)) == ["sample", "timestep", "class_labels"]
    sessions = [deploy.open_session(folder / deploy.graph_file(g)) for g in range(2)]
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 7, 9, 10, 10])  # 10: the null class of guidance
    for group, t in enumerate((800.0, 100.0)):
        tt = torch.full((6,), t)
        set_time_group(qnet, group)
        with torch.no_grad():
            ref, fp = den.call(qnet, x, tt, {"class_labels": y}), den.call(den.net, x, tt, {"class_labels": y})
        (got,) = sessions[group].run(None, {"sample": x.numpy(), "timestep": tt.numpy(), "class_labels": y.numpy()})
        assert float((torch.from_numpy(got) - ref).norm()) <= 0.25 * float((ref - fp).norm())
    kernels = deploy.kernel_report(folder / deploy.graph_file(0))["int8"]
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QGemm", 0) + kernels.get("QLinearMatMul", 0) > 0


@pytest.mark.parametrize("build, inputs", [
    (build_text_pixart, ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]),
    (build_text_sd3, ["sample", "timestep", "encoder_hidden_states", "pooled_projections"])], ids=["pixart", "sd3"])
def test_text_transformer_graphs_take_the_prompt_encodings(tmp_path, build, inputs):
    """The float graph of each text transformer runs in onnxruntime on real prompt encodings (PixArt's padded
    tokens masked out, SD3's pooled projections) and gives the torch model's output."""
    den = load_denoiser(build(tmp_path / "pipe"))
    model = onnx.load_from_string(deploy.export_net(den.net, den))
    assert [i.name for i in model.graph.input] == inputs
    assert not [n for n in model.graph.node if n.op_type == "If"]  # PixArt's squeeze(1): no If, an Identity (onnx._squeeze_dim)
    rows = den.conditioning(PROMPTS, [1, 2, 3, 0], 3.0)
    cond = rows.per_seed()
    x = torch.randn(4, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([99.0, 60.0, 30.0, 1.0])
    with torch.no_grad():
        ref = den.call(den.net, x, t, cond)
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), **{k: v.numpy() for k, v in cond.items()}}
    (got,) = ort_session(model.SerializeToString()).run(None, feeds)
    assert torch.allclose(torch.from_numpy(got), ref, atol=1e-4, rtol=1e-4)
