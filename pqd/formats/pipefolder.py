"""The pipeline folder's layout: a diffusers pipeline saved with ``save_pretrained`` (the model stage's
``data/model/``, and the export folder built from it), as the codecs read it.

``model_index.json`` names the pipeline's components; the denoiser's component folder is ``unet`` or
``transformer``, by which of them the index holds (:func:`denoiser_component`). The demos' model folder also
holds ``fid_features/``, the digit feature network of their FID, which is not a pipeline component.
"""

from __future__ import annotations

import json
from pathlib import Path

from pqd.errors import ModelFolderError

# the pipeline component holding the denoiser, and the diffusers classes supported in it
DENOISER_CLASSES: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DModel", "UNet2DConditionModel"),
    "transformer": ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel"),
}
SUPPORTED = tuple(c for classes in DENOISER_CLASSES.values() for c in classes)
FEATURES_DIR = "fid_features"  # inside the demo's model folder: the digit feature network (evaluate.features)


def denoiser_component(folder: str | Path) -> str:
    """The component folder of a pipeline folder's denoiser: ``unet`` or ``transformer`` (from model_index.json)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    found = [c for c in DENOISER_CLASSES if c in index and index[c] and index[c][0] is not None]
    if not found:
        raise ModelFolderError(f"model folder {folder} has neither a unet nor a transformer component: expected a "
                               f"pipeline whose denoiser is one of {', '.join(SUPPORTED)}")
    return found[0]
