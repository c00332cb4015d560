"""FID with clean-fid: feature extractors (``evaluate.features``), folder features, reference statistics
(``evaluate.reference``). A ``torchscript:<file>`` extractor maps [B, 3, H, W] images in [0, 255] to [B, D].
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from cleanfid import fid as cfid
from cleanfid.downloads_helper import check_download_inception
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer
from PIL import Image
from safetensors.torch import load_file

from pqd.diffusion.digits import DigitNet, reference_uint8
from pqd.errors import FeatureError
from pqd.formats.pipefolder import FEATURES_DIR
from pqd.eval.bootstrap import stats
from pqd.eval.reference import check_image_folder, check_npz, reference_images
from pqd.params import DEMO_SOURCES

INCEPTION_DIM = 2048  # clean-fid's Inception-V3 features: its pool3 layer


@dataclass
class Extractor:
    name: str  # recorded in the protocol
    fn: Callable[[torch.Tensor], torch.Tensor]  # [B, 3, H, W] float in [0, 255] -> [B, D]
    fn_resize: Callable[[np.ndarray], np.ndarray] | None  # clean-fid resizer; None = clean-fid's 299x299 'clean'
    dim: int | None  # D when the network fixes it; None for a TorchScript network (D shows on its first image)


def feature_size(spec: str) -> int | None:
    """D of extractor ``spec`` (``evaluate.features``) before anything is built: the digit network's feature size
    as the model stage trains it, Inception's 2048; None for a TorchScript network."""
    if spec == "demo:digits":
        return DigitNet().feature_dim
    return INCEPTION_DIM if spec == "inception" or spec.startswith("inception:") else None


def probe_size(ex: Extractor, images: str | Path) -> int:
    """D of ``ex``: its ``dim``, else the length of its features of the first image clean-fid reads under ``images``."""
    if ex.dim is not None:
        return ex.dim
    first = reference_images(images)[:1]
    feats = cfid.get_files_features(first, model=ex.fn, num_workers=0, batch_size=1, device=torch.device("cpu"),
                                    mode="clean", custom_fn_resize=ex.fn_resize, verbose=False)
    return int(np.asarray(feats).shape[1])


class DigitFeatures(torch.nn.Module):
    """The digit network's penultimate features of images [B, 3, H, W] in [0, 255] -> [B, D]: the channel mean (a
    gray image read as RGB has three equal channels; a demo:digits16 image's channel mean is its gray digit,
    :func:`pqd.diffusion.digits.digits16_tensor`) on [-1, 1]. ``resize``: images of any other size are first resized to
    8x8 here (antialiased bilinear), for callers that hand over raw images (a TorchScript extractor); the demo's own
    extractor resizes with clean-fid's resizer before (``resize=False``). TorchScript-able."""

    def __init__(self, net: DigitNet, resize: bool = False) -> None:
        super().__init__()
        self.net, self.resize = net, resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x.float().mean(dim=1, keepdim=True) / 255.0
        if self.resize and (gray.shape[-1] != 8 or gray.shape[-2] != 8):
            gray = torch.nn.functional.interpolate(gray, size=(8, 8), mode="bilinear", antialias=True,
                                                   align_corners=False)
        return self.net.features(gray * 2 - 1)


def _digit_extractor(model_dir: Path) -> Extractor:
    folder = model_dir / FEATURES_DIR
    if not (folder / "config.json").is_file():
        raise FeatureError(f"evaluate.features = 'demo:digits' needs {folder}/config.json, written by the model "
                           "stage for model.source 'demo:digits' or 'demo:digits16'; use 'inception' or "
                           "'torchscript:<file>' for other models")
    net = DigitNet(**json.loads((folder / "config.json").read_text()))
    net.load_state_dict(load_file(folder / "model.safetensors"))
    features = DigitFeatures(net.eval()).eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return features(x)

    clean_8x8 = make_resizer("PIL", False, "bicubic", (8, 8))  # clean-fid's 'clean' resize, to 8x8

    def resize(img: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 -> [8, 8, 3] float32 in [0, 255]; larger images (demo:digits16) are downsampled by
        clean-fid's 'clean' resizer (PIL bicubic with antialiasing, per channel, in float)."""
        return (img if img.shape[:2] == (8, 8) else clean_8x8(img)).astype(np.float32)

    return Extractor("demo:digits (DigitNet penultimate features)", fn, resize, net.feature_dim)


def _inception_extractor(local: str | None, device: str) -> Extractor:
    if local is not None:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FeatureError(f"evaluate.features = 'inception:{local}': file not found "
                               "(expected clean-fid's inception-2015-12-05.pt)")
        folder, fname = path.parent, path.name
    else:
        folder, fname = Path(tempfile.gettempdir()), "inception-2015-12-05.pt"
        if not (folder / fname).is_file():
            old_timeout = socket.getdefaulttimeout()
            socket.setdefaulttimeout(20)  # clean-fid's urlopen has no timeout of its own
            try:
                with tempfile.TemporaryDirectory(dir=folder) as part:  # no half-written file is ever left behind
                    os.replace(check_download_inception(fpath=part), folder / fname)
            except Exception as e:  # noqa: BLE001 - any network failure means the same thing to the user
                raise FeatureError(
                    f"evaluate.features = 'inception': the Inception weights could not be fetched ({type(e).__name__}); "
                    "download inception-2015-12-05.pt once and set evaluate.features to 'inception:<path>'") from None
            finally:
                socket.setdefaulttimeout(old_timeout)
    if fname != "inception-2015-12-05.pt":  # InceptionV3W loads that file name from a folder
        link = Path(tempfile.mkdtemp()) / "inception-2015-12-05.pt"
        link.symlink_to(folder / fname)
        folder = link.parent
    model = InceptionV3W(str(folder), download=False).to(device).eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(device))

    return Extractor(f"clean-fid Inception-V3 (pool3, {INCEPTION_DIM}-d, clean resize)", fn, None, INCEPTION_DIM)


def _torchscript_extractor(path_str: str, device: str) -> Extractor:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FeatureError(f"evaluate.features = 'torchscript:{path_str}': file not found")
    try:
        with warnings.catch_warnings():  # TorchScript is the format we ask users for; its deprecation is ours to act on
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # noqa: BLE001
        raise FeatureError(f"evaluate.features = 'torchscript:{path_str}': not a TorchScript file ({type(e).__name__})") from None

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x.to(device)).reshape(x.shape[0], -1)

    def resize(img: np.ndarray) -> np.ndarray:
        return img.astype(np.float32)

    return Extractor(f"torchscript:{path.name}", fn, resize, None)


def build_extractor(spec: str, model_dir: str | Path, device: str = "cpu") -> Extractor:
    if spec == "demo:digits":
        return _digit_extractor(Path(model_dir))
    if spec == "inception":
        return _inception_extractor(None, device)
    if spec.startswith("inception:"):
        return _inception_extractor(spec.split(":", 1)[1], device)
    if spec.startswith("torchscript:"):
        return _torchscript_extractor(spec.split(":", 1)[1], device)
    raise FeatureError(f"evaluate.features = {spec!r} is not allowed: expected 'demo:digits', 'inception', "
                       "'inception:<file>' or 'torchscript:<file>'")


def folder_features(folder: str | Path, ex: Extractor, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Features [N, D] (float64) of every image under ``folder``, read and resized by clean-fid."""
    folder = Path(folder)
    feats = cfid.get_folder_features(str(folder), model=ex.fn, num_workers=0, batch_size=batch_size,
                                     device=torch.device(device), mode="clean", custom_fn_resize=ex.fn_resize,
                                     description=f"features {folder.name}", verbose=False)
    if len(feats) < 2:
        raise FeatureError(f"{folder}: found {len(feats)} images, need at least 2 for FID")
    return np.asarray(feats, dtype=np.float64)


def write_demo_reference(folder: str | Path, source: str = "demo:digits") -> int:
    """Write the reference images of demo ``source`` as PNGs into ``folder`` (the 1,797 sklearn digits: 8x8
    grayscale for 'demo:digits', 16x16 RGB for 'demo:digits16'); returns the count."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    imgs = reference_uint8(source)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(Path(folder) / f"{i:05d}.png")
    return len(imgs)


def reference_stats(spec: str, ex: Extractor, batch_size: int = 256, device: str = "cpu",
                    dim: int | None = None) -> tuple[tuple[np.ndarray, np.ndarray], str, int]:
    """(mu, sigma), a description and the image count of the reference set ``evaluate.reference``; a .npz must hold
    statistics of D = ``dim`` features (default ``ex.dim``; see :func:`probe_size`), a folder readable images."""
    if spec in DEMO_SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            n = write_demo_reference(tmp, spec)
            what = "8x8 gray" if spec == "demo:digits" else "16x16 RGB, as demo:digits16 trains on them"
            return stats(folder_features(tmp, ex, batch_size, device)), f"sklearn digits ({n:,} images, {what})", n
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        check_npz(spec, ex.dim if dim is None else dim)
        with np.load(path, allow_pickle=False) as z:
            return (z["mu"], z["sigma"]), f"precomputed statistics {path.name}", int(z["n"]) if "n" in z else -1
    if not path.is_dir():
        raise FeatureError(f"evaluate.reference = {spec!r} is not allowed: expected 'demo:digits', 'demo:digits16', "
                           "a folder of images or a .npz with mu and sigma")
    check_image_folder(spec)
    feats = folder_features(path, ex, batch_size, device)
    return stats(feats), f"folder {path}", len(feats)
