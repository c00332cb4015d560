"""Whether an ``evaluate.reference`` can give FID reference statistics, checked before any features are computed
(by ``python -m pqd.stages.preflight`` and by the evaluate stage before it samples)."""

from __future__ import annotations

import os
from glob import glob
from pathlib import Path

import numpy as np
from cleanfid.utils import EXTENSIONS
from PIL import Image, UnidentifiedImageError

from pqd.errors import FeatureError

ALLOWED = "'demo:digits', 'demo:digits16', a folder of at least 2 images or a .npz with mu and sigma"
_SHOWN = 3  # file names quoted in an error


def reference_images(folder: str | Path) -> list[str]:
    """The files clean-fid reads from ``folder`` (pqd.eval.fid.folder_features), listed the way it lists them."""
    return sorted(f for ext in EXTENSIONS for f in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def _unreadable(file: str) -> str | None:
    """Why clean-fid could not read ``file`` as an image (None when it can)."""
    try:
        if file.endswith(".npy"):
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
            return None if arr.ndim == 3 and arr.shape[2] == 3 else f"holds an array of shape {list(arr.shape)}, not [H, W, 3]"
        with Image.open(file) as im:
            im.verify()
        return None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"is not an image PIL can open ({type(e).__name__})"


def check_image_folder(spec: str) -> int:
    """The number of images in the reference folder ``spec``; a FeatureError when fewer than 2 or one is unreadable."""
    folder = Path(spec).expanduser()
    files = reference_images(folder)
    bad = next(((f, why) for f in files if (why := _unreadable(f))), None)
    if bad is not None:
        raise FeatureError(f"evaluate.reference = {spec!r} is not allowed: {os.path.relpath(bad[0], folder)}, one of the "
                           f"{len(files)} image files found, {bad[1]}; expected {ALLOWED}")
    if len(files) < 2:
        others = sorted(p.name for p in folder.rglob("*") if p.is_file())
        seen = f" (and {len(others)} other file{'s' if len(others) > 1 else ''}: {', '.join(others[:_SHOWN])}" \
               f"{', ...' if len(others) > _SHOWN else ''})" if others else ""
        exts = ", ".join(sorted({"." + e.lower() for e in EXTENSIONS}))
        raise FeatureError(f"evaluate.reference = {spec!r} is not allowed: the folder holds {len(files)} images clean-fid reads{seen}; "
                           f"expected {ALLOWED} (clean-fid reads {exts})")
    return len(files)


def check_npz(spec: str, dim: int | None) -> None:
    """The ``.npz`` reference ``spec`` holds ``mu`` [dim] and ``sigma`` [dim, dim] (any matching D when ``dim`` is None);
    a FeatureError otherwise."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FeatureError(f"evaluate.reference = {spec!r} is not allowed: file not found; expected {ALLOWED}")
    try:
        with np.load(path, allow_pickle=False) as z:
            shapes = {k: z[k].shape for k in ("mu", "sigma") if k in z}
    except (OSError, ValueError) as e:
        raise FeatureError(f"evaluate.reference = {spec!r} is not allowed: not a readable .npz ({type(e).__name__}); "
                           f"expected {ALLOWED}") from None
    if len(shapes) < 2:
        raise FeatureError(f"evaluate.reference = {spec!r} is not allowed: it holds no {' and no '.join(sorted({'mu', 'sigma'} - set(shapes)))}; "
                           "expected arrays 'mu' [D] and 'sigma' [D, D] of the extractor's feature size D")
    d = dim if dim is not None else (shapes["mu"][0] if len(shapes["mu"]) == 1 else -1)
    if shapes["mu"] != (d,) or shapes["sigma"] != (d, d):
        size = f"the extractor's feature size D = {dim}" if dim is not None else "one feature size D"
        raise FeatureError(f"evaluate.reference = {spec!r} is not allowed: mu has shape {list(shapes['mu'])} and sigma "
                           f"{list(shapes['sigma'])}; expected mu [D] and sigma [D, D] with {size} (evaluate.features)")
