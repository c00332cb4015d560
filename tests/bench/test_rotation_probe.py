import torch

from pqd.bench import rotation
from pqd.core.rotate import rotate_attention
from pqd.diffusion.adapter import load_denoiser


def test_the_probe_reports_the_rotated_weights_of_a_pipeline_folder(tiny_pipeline, capsys):
    assert rotation.main(["--models", str(tiny_pipeline)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    r = rotation.probe(tiny_pipeline, "hadamard", 4, "minmax")
    assert r["rotated"] == 4 and row.startswith(f"| {tiny_pipeline} | 4 (hadamard) | 0 | {r['err'][0]:.5f} -> ")
    # the numbers are those of the rotated network's own weights
    net = load_denoiser(tiny_pipeline).net
    rotate_attention(net, "hadamard")
    names = [n for n, _ in net.named_modules() if n.endswith(("to_v", "to_out.0"))]
    after = sum(rotation.weight_stats(net.get_submodule(n).weight, 4, "minmax")[0] for n in names) / len(names)
    assert abs(after - r["err"][1]) < 1e-9 and torch.isfinite(torch.tensor(r["crest"])).all()


def test_a_folder_that_is_not_a_pipeline_is_one_line(tmp_path, capsys):
    assert rotation.main(["--models", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"pqd bench rotation: error: --models {tmp_path}: not a diffusers "
                                               "pipeline folder (no model_index.json)")
