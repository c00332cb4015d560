"""The demos' FID features (pqd.eval.fid's digit extractor) read a 16x16 RGB digits16 image as its gray digit at
8x8, through clean-fid's own image loading and resizing."""

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from pqd.diffusion import demo, digits
from pqd.eval import fid
from pqd.formats.pipefolder import FEATURES_DIR


def feature_folder(tmp_path, net):
    folder = tmp_path / "model" / FEATURES_DIR
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(__import__("json").dumps(net.config()))
    return tmp_path / "model"


def test_the_extractor_reads_digits16_images_as_their_digits(tmp_path):
    images, labels = digits.load_digits_tensor()
    net, _ = demo.train_digit_net(images, labels, seed=0, epochs=6, progress=False)
    ex = fid.build_extractor("demo:digits", feature_folder(tmp_path, net))
    n_8 = fid.write_demo_reference(tmp_path / "ref8", "demo:digits")
    n_16 = fid.write_demo_reference(tmp_path / "ref16", "demo:digits16")
    assert n_8 == n_16 == 1797
    f8, f16 = fid.folder_features(tmp_path / "ref8", ex), fid.folder_features(tmp_path / "ref16", ex)
    assert f8.shape == f16.shape == (1797, 128)
    with torch.no_grad():
        head = lambda f: net.head(torch.from_numpy(f).float()).argmax(1)  # noqa: E731 - classify from the features
        acc8 = float((head(f8) == labels).float().mean())
        acc16 = float((head(f16) == labels).float().mean())
    # the 16x16 RGB view is the same digit, a little smoother: classified about as well as the 8x8 originals
    assert acc8 > 0.9 and acc16 > acc8 - 0.05


def test_colour_does_not_change_the_features(tmp_path):
    """An RGB digits16 image and the gray image of its channel mean have the same features (up to the resizer's
    clipping of bicubic overshoot to [0, 255], which acts per channel)."""
    images, labels = digits.load_digits_tensor()
    net, _ = demo.train_digit_net(images[:200], labels[:200], seed=0, epochs=1, progress=False)
    ex = fid.build_extractor("demo:digits", feature_folder(tmp_path, net))
    rgb = digits.reference_uint8("demo:digits16")[:40]
    gray = np.repeat(rgb.astype(np.float64).mean(-1, keepdims=True), 3, axis=-1)
    for name, imgs in (("rgb", rgb), ("gray", gray)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(imgs):  # gray stored losslessly as float .npy: PNG would round the mean
            np.save(tmp_path / name / f"{i:03d}.npy", im.astype(np.float32)) if name == "gray" else \
                Image.fromarray(im).save(tmp_path / name / f"{i:03d}.png")
    fr, fg = fid.folder_features(tmp_path / "rgb", ex), fid.folder_features(tmp_path / "gray", ex)
    np.testing.assert_allclose(fr, fg, rtol=0, atol=5e-3 * np.abs(fg).max())
