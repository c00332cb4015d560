"""pqd.eval.reference: a reference folder is counted the way clean-fid lists it and every image must open; a .npz
must hold mu [D] and sigma [D, D]; the feature size D comes from the extractor."""

import numpy as np
import pytest
from PIL import Image

from pqd.diffusion.demo import DigitNet
from pqd.errors import FeatureError
from pqd.eval import fid
from pqd.eval.reference import check_image_folder, check_npz, reference_images


def test_a_folder_counts_the_images_clean_fid_reads(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "a/0.png")
    Image.new("L", (4, 4)).save(tmp_path / "a/b/1.JPG", format="JPEG")  # nested, upper-case extension
    np.save(tmp_path / "a/2.npy", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "a/readme.md").write_text("not counted")
    assert check_image_folder(str(tmp_path / "a")) == 3 == len(reference_images(tmp_path / "a"))
    np.save(tmp_path / "a/3.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(FeatureError, match=r"3.npy, one of the 4 image files found, holds an array of shape \[4, 4\], not "):
        check_image_folder(str(tmp_path / "a"))
    (tmp_path / "one").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "one/0.png")
    with pytest.raises(FeatureError, match=r"^evaluate.reference = '.*one' is not allowed: the folder holds 1 images clean-fid"):
        check_image_folder(str(tmp_path / "one"))


def test_an_npz_holds_mu_and_sigma_of_the_feature_size(tmp_path):
    f = tmp_path / "s.npz"
    np.savez(f, mu=np.zeros(4), sigma=np.eye(4))
    check_npz(str(f), 4)
    check_npz(str(f), None)
    with pytest.raises(FeatureError, match=r"mu has shape \[4\] and sigma \[4, 4\]; .* feature size D = 2048"):
        check_npz(str(f), 2048)
    np.savez(f, mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(FeatureError, match=r"with one feature size D"):
        check_npz(str(f), None)
    np.savez(f, mean=np.zeros(4))
    with pytest.raises(FeatureError, match=r"it holds no mu and no sigma"):
        check_npz(str(f), None)
    f.write_bytes(b"not a zip")
    with pytest.raises(FeatureError, match=r"not a readable .npz"):
        check_npz(str(f), None)
    with pytest.raises(FeatureError, match=r"file not found"):
        check_npz(str(tmp_path / "none.npz"), None)


def test_the_feature_size_is_the_extractors(tmp_path, ts_features):
    assert fid.feature_size("demo:digits") == DigitNet().feature_dim == 128
    assert fid.feature_size("inception") == fid.feature_size("inception:/w.pt") == 2048
    assert fid.feature_size(f"torchscript:{ts_features}") is None
    ex = fid.build_extractor(f"torchscript:{ts_features}", tmp_path)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "0.png")
    assert ex.dim is None and fid.probe_size(ex, tmp_path) == 6  # the test network's 6 features
